//! `sealvol bench`: full volume lifecycles against a real node plugin, as kubelet and
//! external-provisioner would drive it, first one after another and then concurrently. Prints
//! a table and, last, one JSON line. Figures, never a pass or fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sealvol::client::CsiClient;
use sealvol::harness::{ScratchNode, requests};
use sealvol::proto::csi::v1 as csi;
use tokio::sync::Semaphore;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Lifecycles per phase.
    #[arg(long, default_value_t = 50)]
    volumes: usize,
    /// Lifecycles in flight at once in the concurrent phase.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Capacity of each volume, in bytes or with Ki/Mi/Gi.
    #[arg(long, default_value = "1Gi")]
    size: String,
    /// keyMode of the volumes (only `none` until the key issue lands).
    #[arg(long, default_value = "none")]
    key_mode: String,
    /// Directory to put the scratch pool in (default: the system temp dir).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

struct Lifecycle {
    ready: Duration,
    teardown: Duration,
}

fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    let (num, mult) = match s {
        _ if s.ends_with("Gi") => (&s[..s.len() - 2], 1i64 << 30),
        _ if s.ends_with("Mi") => (&s[..s.len() - 2], 1 << 20),
        _ if s.ends_with("Ki") => (&s[..s.len() - 2], 1 << 10),
        _ => (s, 1),
    };
    let n: i64 = num.parse().with_context(|| format!("--size {s:?}"))?;
    n.checked_mul(mult).context("--size overflows")
}

async fn lifecycle(
    mut client: CsiClient,
    node: Arc<ScratchNode>,
    name: String,
    bytes: i64,
    key_mode: String,
) -> anyhow::Result<Lifecycle> {
    let pod = format!("pod-{name}");
    let start = Instant::now();
    let created = client
        .controller
        .create_volume(requests::create(&name, bytes, &[("keyMode", &key_mode)]))
        .await?
        .into_inner();
    let id = created
        .volume
        .context("CreateVolume returned no volume")?
        .volume_id;
    client.node.node_stage_volume(node.stage(&id)).await?;
    client
        .node
        .node_publish_volume(node.publish(&id, &pod))
        .await?;
    let ready = start.elapsed();
    let start = Instant::now();
    client
        .node
        .node_unpublish_volume(node.unpublish(&id, &pod))
        .await?;
    client.node.node_unstage_volume(node.unstage(&id)).await?;
    client
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            secrets: Default::default(),
        })
        .await?;
    Ok(Lifecycle {
        ready,
        teardown: start.elapsed(),
    })
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted_ms.len() - 1) as f64).round() as usize;
    sorted_ms[rank.min(sorted_ms.len() - 1)]
}

struct Phase {
    ready_ms: Vec<f64>,
    teardown_ms: Vec<f64>,
    errors: usize,
    wall: Duration,
}

async fn phase(
    node: &Arc<ScratchNode>,
    client: &CsiClient,
    label: &str,
    args: &BenchArgs,
    concurrency: usize,
    bytes: i64,
) -> Phase {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for i in 0..args.volumes {
        let permit = Arc::clone(&gate);
        let (client, node, key_mode) = (client.clone(), Arc::clone(node), args.key_mode.clone());
        let name = format!("bench-{label}-{i}");
        tasks.spawn(async move {
            let _permit = permit.acquire_owned().await;
            lifecycle(client, node, name, bytes, key_mode).await
        });
    }
    let mut out = Phase {
        ready_ms: Vec::new(),
        teardown_ms: Vec::new(),
        errors: 0,
        wall: Duration::ZERO,
    };
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(l)) => {
                out.ready_ms.push(l.ready.as_secs_f64() * 1000.0);
                out.teardown_ms.push(l.teardown.as_secs_f64() * 1000.0);
            }
            Ok(Err(e)) => {
                eprintln!("lifecycle failed: {e:#}");
                out.errors += 1;
            }
            Err(e) => {
                eprintln!("lifecycle task failed: {e}");
                out.errors += 1;
            }
        }
    }
    out.wall = start.elapsed();
    out.ready_ms.sort_by(f64::total_cmp);
    out.teardown_ms.sort_by(f64::total_cmp);
    out
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "sealvol bench needs root: it creates loop devices and mounts"
    );
    let bytes = parse_bytes(&args.size)?;
    let exe = std::env::current_exe().context("locating the sealvol binary")?;
    let mut node = ScratchNode::new(&exe, args.dir.as_deref())?;
    let client = node.start(&[("SEALVOL_LOG", "warn")]).await?;
    let node = Arc::new(node);
    println!(
        "sealvol bench: {} lifecycles of {} volumes (keyMode {}), sequential then {} at once; pool in {}",
        args.volumes,
        args.size,
        args.key_mode,
        args.concurrency,
        node.pool_dir.display()
    );
    let seq = phase(&node, &client, "seq", &args, 1, bytes).await;
    let conc = phase(&node, &client, "conc", &args, args.concurrency, bytes).await;
    let leaked_loops = node.loop_devices().len();
    let leaked_mounts = node.mounts().len();
    let leftover_files = node.pool_files().len();
    let rss = node.rss_max_kib().unwrap_or(0);

    println!();
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>8}",
        "phase / step", "p50 ms", "p99 ms", "max ms", "vols/s"
    );
    for (label, p) in [("sequential", &seq), ("concurrent", &conc)] {
        let rate = p.ready_ms.len() as f64 / p.wall.as_secs_f64().max(1e-9);
        for (step, v) in [
            ("ready (create+stage+publish)", &p.ready_ms),
            ("teardown (unpub+unstage+delete)", &p.teardown_ms),
        ] {
            println!(
                "{:<40} {:>9.2} {:>9.2} {:>9.2} {:>8.1}",
                format!("{label} {step}"),
                percentile(v, 50.0),
                percentile(v, 99.0),
                v.last().copied().unwrap_or(0.0),
                rate
            );
        }
    }
    println!(
        "errors {} | leaked loop devices {} | leaked mounts {} | leftover pool files {} | node RSS max {} KiB",
        seq.errors + conc.errors,
        leaked_loops,
        leaked_mounts,
        leftover_files,
        rss
    );
    let json = serde_json::json!({
        "key_mode": args.key_mode,
        "volumes": args.volumes,
        "concurrency": args.concurrency,
        "size_bytes": bytes,
        "ready_p50_ms": round2(percentile(&seq.ready_ms, 50.0)),
        "ready_p99_ms": round2(percentile(&seq.ready_ms, 99.0)),
        "teardown_p50_ms": round2(percentile(&seq.teardown_ms, 50.0)),
        "teardown_p99_ms": round2(percentile(&seq.teardown_ms, 99.0)),
        "concurrent_ready_p50_ms": round2(percentile(&conc.ready_ms, 50.0)),
        "concurrent_ready_p99_ms": round2(percentile(&conc.ready_ms, 99.0)),
        "concurrent_teardown_p50_ms": round2(percentile(&conc.teardown_ms, 50.0)),
        "concurrent_teardown_p99_ms": round2(percentile(&conc.teardown_ms, 99.0)),
        "errors": seq.errors + conc.errors,
        "leaked_loop_devices": leaked_loops,
        "leaked_mounts": leaked_mounts,
        "leftover_pool_files": leftover_files,
        "rss_max_kib": rss,
    });
    println!("{json}");
    Ok(())
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
