//! `sealvol bench`: full volume lifecycles against a real node plugin, as kubelet and
//! external-provisioner would drive it, first one after another and then concurrently. Prints
//! a table and, last, one JSON line. Figures, never a pass or fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sealvol::client::CsiClient;
use sealvol::harness::azure::EmulatorProcess;
use sealvol::harness::keys::with_pod_token;
use sealvol::harness::{ScratchNode, requests};
use sealvol::proto::csi::v1 as csi;
use tokio::sync::Semaphore;

mod chaos;
mod snapshots;

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
    /// keyMode of the volumes: none, keyvault-key or keyvault-secret (the last two against
    /// an Azure emulator the benchmark starts).
    #[arg(long, default_value = "none", value_parser = ["none", "keyvault-key", "keyvault-secret"])]
    key_mode: String,
    /// provisioning of the volumes: thick (blocks reserved at create) or thin (sparse).
    #[arg(long, default_value = "thick", value_parser = ["thick", "thin"])]
    provisioning: String,
    /// Republishes (kubelet's requiresRepublish) of each published volume, timed.
    #[arg(long, default_value_t = 5)]
    republishes: usize,
    /// Directory to put the scratch pool in (default: the system temp dir).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Passed to the node plugin: 0 makes every republish re-authorize with Key Vault.
    #[arg(long)]
    reauthorize_interval: Option<String>,
    /// Instead of lifecycles: the time from a revocation to the volume's lock, for several
    /// re-authorization intervals, with kubelet-like republishes every 250 ms.
    #[arg(long)]
    revocation: bool,
    /// Instead of lifecycles: mount this many unrelated tmpfs filesystems first (a busy node's
    /// secrets, projected tokens and overlays), then make `--volumes` volumes ready one by one
    /// and keep them published, republish each, and tear them all down: how per-call cost
    /// grows with the node's mounts and volumes.
    #[arg(long, default_value_t = 0)]
    foreign_mounts: usize,
    /// Instead of lifecycles: run them for this long (e.g. 10m) with `--concurrency` workers
    /// (at most 8) while the node plugin is killed and restarted at random moments, and check
    /// every volume's data (`chaos.rs`).
    #[arg(long, value_parser = crate::parse_duration)]
    chaos: Option<Duration>,
    /// Instead of lifecycles: snapshot and restore times against the data a volume holds
    /// (64 MiB, 512 MiB, 2 GiB written), next to `cp --sparse=always` of its file.
    #[arg(long)]
    snapshots: bool,
    /// With --snapshots: back each snapshot up to Blob storage (Azurite behind the emulator;
    /// needs azurite-blob) and restore it on a second node.
    #[arg(long, requires = "snapshots")]
    backups: bool,
    /// Instead of lifecycles: fio on a plain and an encrypted volume of the same pool
    /// (sequential 1 MiB and random 4 KiB, read and write); needs fio.
    #[arg(long)]
    fio: bool,
}

struct Lifecycle {
    ready: Duration,
    teardown: Duration,
    republish: Vec<Duration>,
}

/// What every lifecycle needs: the StorageClass parameters and, for encrypted volumes, the
/// emulator that mints each pod's token.
struct Setup {
    params: Vec<(String, String)>,
    azure: Option<EmulatorProcess>,
    republishes: usize,
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

/// What kubelet and external-provisioner do when the pod and its claim go: unpublish, unstage,
/// delete.
async fn teardown(
    client: &mut CsiClient,
    node: &ScratchNode,
    id: String,
    pod: &str,
) -> anyhow::Result<()> {
    client
        .node
        .node_unpublish_volume(node.unpublish(&id, pod))
        .await?;
    client.node.node_unstage_volume(node.unstage(&id)).await?;
    client
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            secrets: Default::default(),
        })
        .await?;
    Ok(())
}

/// A volume made ready as kubelet and external-provisioner make it: created, staged and
/// published for `pod` (with the pod's token for encrypted volumes). Returns its id, the
/// publish request (for republishes) and how long create, stage and publish took.
async fn make_ready(
    client: &mut CsiClient,
    node: &ScratchNode,
    setup: &Setup,
    token: Option<&str>,
    name: &str,
    pod: &str,
    bytes: i64,
) -> anyhow::Result<(String, csi::NodePublishVolumeRequest, [Duration; 3])> {
    let params: Vec<(&str, &str)> = setup
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let start = Instant::now();
    let id = client
        .controller
        .create_volume(requests::create(name, bytes, &params))
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?
        .volume_id;
    let created = start.elapsed();
    client.node.node_stage_volume(node.stage(&id)).await?;
    let staged = start.elapsed();
    let mut publish = node.publish(&id, pod);
    if let Some(token) = token {
        with_pod_token(
            &mut publish,
            token,
            "api://AzureADTokenExchange",
            "demo",
            "app",
            true,
        );
    }
    client.node.node_publish_volume(publish.clone()).await?;
    let ready = start.elapsed();
    Ok((id, publish, [created, staged - created, ready - staged]))
}

/// A pod's token, as kubelet fetches one before the calls (None for unencrypted volumes).
async fn pod_token(setup: &Setup) -> anyhow::Result<Option<String>> {
    match &setup.azure {
        Some(azure) => Ok(Some(azure.mint_token("cluster", "demo", "app").await?)),
        None => Ok(None),
    }
}

async fn lifecycle(
    mut client: CsiClient,
    node: Arc<ScratchNode>,
    setup: Arc<Setup>,
    name: String,
    bytes: i64,
) -> anyhow::Result<Lifecycle> {
    let pod = format!("pod-{name}");
    let token = pod_token(&setup).await?;
    let (id, publish, steps) = make_ready(
        &mut client,
        &node,
        &setup,
        token.as_deref(),
        &name,
        &pod,
        bytes,
    )
    .await?;
    let ready = steps.iter().sum();
    let mut republish = Vec::with_capacity(setup.republishes);
    for _ in 0..setup.republishes {
        let start = Instant::now();
        client.node.node_publish_volume(publish.clone()).await?;
        republish.push(start.elapsed());
    }
    let start = Instant::now();
    teardown(&mut client, &node, id, &pod).await?;
    Ok(Lifecycle {
        ready,
        teardown: start.elapsed(),
        republish,
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
    republish_ms: Vec<f64>,
    errors: usize,
    wall: Duration,
}

async fn phase(
    node: &Arc<ScratchNode>,
    client: &CsiClient,
    setup: &Arc<Setup>,
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
        let (client, node, setup) = (client.clone(), Arc::clone(node), Arc::clone(setup));
        let name = format!("bench-{label}-{i}");
        tasks.spawn(async move {
            let _permit = permit.acquire_owned().await;
            lifecycle(client, node, setup, name, bytes).await
        });
    }
    let mut out = Phase {
        ready_ms: Vec::new(),
        teardown_ms: Vec::new(),
        republish_ms: Vec::new(),
        errors: 0,
        wall: Duration::ZERO,
    };
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(l)) => {
                out.ready_ms.push(l.ready.as_secs_f64() * 1000.0);
                out.teardown_ms.push(l.teardown.as_secs_f64() * 1000.0);
                out.republish_ms
                    .extend(l.republish.iter().map(|d| d.as_secs_f64() * 1000.0));
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
    out.republish_ms.sort_by(f64::total_cmp);
    out
}

/// The fio jobs: name, rw mode, block size.
const FIO_JOBS: &[(&str, &str, &str)] = &[
    ("seq-write 1M", "write", "1M"),
    ("seq-read 1M", "read", "1M"),
    ("rand-write 4k", "randwrite", "4k"),
    ("rand-read 4k", "randread", "4k"),
];

/// Runs one fio job in `dir`; returns (MB/s, IOPS).
fn fio(dir: &str, rw: &str, bs: &str) -> anyhow::Result<(f64, f64)> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=sealvol",
            "--output-format=json",
            "--ioengine=psync",
            "--size=256M",
            "--runtime=10",
            "--time_based=0",
            "--end_fsync=1",
            "--invalidate=1",
        ])
        .arg(format!("--directory={dir}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .output()
        .context("running fio (apt-get install fio)")?;
    anyhow::ensure!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    Ok((
        side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        side["iops"].as_f64().unwrap_or(0.0),
    ))
}

/// The Azure emulator with the demo's tenant, app identity and vault, and the scratch node set
/// up to use it (not started yet): the node, the emulator and the vault's URL.
fn with_emulator(
    exe: &std::path::Path,
    scratch: ScratchNode,
    extra_flags: &[String],
) -> anyhow::Result<(ScratchNode, EmulatorProcess, String)> {
    let identity = [(crate::demo::APP_CLIENT, crate::demo::APP_OID, "app")];
    let azure =
        EmulatorProcess::start(exe, &scratch.root, &crate::demo::emulator_config(&identity))?;
    let vault = azure.vault_url("demo-kv").context("no vault")?.to_string();
    let mut flags = azure.node_args(crate::demo::TENANT);
    flags.extend_from_slice(extra_flags);
    let node = scratch.with_args(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    Ok((node, azure, vault))
}

async fn fio_compare(exe: &std::path::Path, args: &BenchArgs) -> anyhow::Result<()> {
    let scratch = ScratchNode::new(exe, args.dir.as_deref())?;
    let (mut node, azure, vault) = with_emulator(exe, scratch, &[])?;
    let mut client = node.start(&[("SEALVOL_LOG", "warn")]).await?;
    let token = azure.mint_token("cluster", "demo", "app").await?;
    let encrypted = [
        ("keyMode", "keyvault-key"),
        ("keyVaultURL", vault.as_str()),
        ("keyName", "kek"),
        ("clientID", crate::demo::APP_CLIENT),
    ];
    let mut targets = Vec::new();
    for (name, params) in [
        ("plain", &[("keyMode", "none")][..]),
        ("encrypted", &encrypted[..]),
    ] {
        let id = client
            .controller
            .create_volume(requests::create(&format!("fio-{name}"), 1 << 30, params))
            .await?
            .into_inner()
            .volume
            .context("no volume")?
            .volume_id;
        client.node.node_stage_volume(node.stage(&id)).await?;
        let mut publish = node.publish(&id, name);
        with_pod_token(
            &mut publish,
            &token,
            "api://AzureADTokenExchange",
            "demo",
            "app",
            true,
        );
        client.node.node_publish_volume(publish).await?;
        targets.push(node.target_path(name, &id));
    }
    println!(
        "fio, psync, 256 MiB per job, buffered with a final fsync (fscrypt without inline encryption does no O_DIRECT), on one loop-file pool\n"
    );
    println!(
        "{:<16} {:>14} {:>14} {:>18} {:>8}",
        "job", "plain MB/s", "encrypted MB/s", "plain/encr. IOPS", "ratio"
    );
    let mut rows = serde_json::Map::new();
    for (label, rw, bs) in FIO_JOBS {
        let (plain_bw, plain_iops) = fio(&targets[0], rw, bs)?;
        let (enc_bw, enc_iops) = fio(&targets[1], rw, bs)?;
        let ratio = if plain_bw > 0.0 {
            enc_bw / plain_bw
        } else {
            0.0
        };
        println!(
            "{label:<16} {plain_bw:>14.1} {enc_bw:>14.1} {:>18} {ratio:>8.2}",
            format!("{plain_iops:.0}/{enc_iops:.0}")
        );
        rows.insert(label.to_string(), serde_json::json!({"plain_mb_s": round2(plain_bw), "encrypted_mb_s": round2(enc_bw), "ratio": round2(ratio)}));
    }
    println!("{}", serde_json::Value::Object(rows));
    node.kill();
    Ok(())
}

/// One revocation trial: publish, revoke the role at a random moment, republish every
/// `period` until the volume locks; returns the time from the revocation to the lock.
async fn time_to_lock(
    exe: &std::path::Path,
    args: &BenchArgs,
    interval_ms: u64,
    period: Duration,
    trial: usize,
) -> anyhow::Result<Duration> {
    let scratch = ScratchNode::new(exe, args.dir.as_deref())?;
    let interval = format!("--reauthorize-interval={interval_ms}ms");
    let (mut node, azure, vault) = with_emulator(exe, scratch, &[interval])?;
    let mut client = node.start(&[("SEALVOL_LOG", "warn")]).await?;
    let params = [
        ("keyMode", "keyvault-key"),
        ("keyVaultURL", vault.as_str()),
        ("keyName", "kek"),
        ("clientID", crate::demo::APP_CLIENT),
    ];
    let id = client
        .controller
        .create_volume(requests::create(
            &format!("revoke-{trial}"),
            64 << 20,
            &params,
        ))
        .await?
        .into_inner()
        .volume
        .context("no volume")?
        .volume_id;
    client.node.node_stage_volume(node.stage(&id)).await?;
    let token = azure.mint_token("cluster", "demo", "app").await?;
    let mut publish = node.publish(&id, "pod");
    with_pod_token(
        &mut publish,
        &token,
        "api://AzureADTokenExchange",
        "demo",
        "app",
        true,
    );
    client.node.node_publish_volume(publish.clone()).await?;
    // Revoke at a pseudo-random point of the interval (spread over the trials).
    let spread = interval_ms.max(period.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis((trial as u64 * 7919) % spread.max(1))).await;
    let (role, scope) = (
        "Key Vault Crypto Service Encryption User",
        "/vaults/demo-kv/keys/kek",
    );
    azure
        .set_role(crate::demo::APP_OID, role, scope, false)
        .await?;
    let revoked = Instant::now();
    let locked = loop {
        match client.node.node_publish_volume(publish.clone()).await {
            Err(s) if s.code() == tonic::Code::PermissionDenied => break revoked.elapsed(),
            _ if revoked.elapsed() > Duration::from_secs(60) => {
                anyhow::bail!("no lock within a minute")
            }
            _ => tokio::time::sleep(period).await,
        }
    };
    teardown(&mut client, &node, id, "pod").await?;
    node.kill();
    Ok(locked)
}

async fn revocation_figures(exe: &std::path::Path, args: &BenchArgs) -> anyhow::Result<()> {
    let period = Duration::from_millis(250);
    println!(
        "time from revocation to lock; kubelet-like republish every {} ms (a real kubelet: 60-90 s)\n",
        period.as_millis()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>22}",
        "reauthorize interval", "min ms", "mean ms", "max ms", "bound (interval+period)"
    );
    let mut rows = serde_json::Map::new();
    for interval_ms in [0u64, 1000, 2000, 4000] {
        let mut samples = Vec::new();
        for trial in 0..3 {
            samples.push(
                time_to_lock(exe, args, interval_ms, period, trial)
                    .await?
                    .as_secs_f64()
                    * 1000.0,
            );
        }
        samples.sort_by(f64::total_cmp);
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let bound = interval_ms as f64 + period.as_millis() as f64;
        println!(
            "{:<22} {:>10.0} {:>10.0} {:>10.0} {:>22.0}",
            format!("{interval_ms} ms"),
            samples[0],
            mean,
            samples[samples.len() - 1],
            bound
        );
        rows.insert(format!("{interval_ms}ms"), serde_json::json!({"min_ms": round2(samples[0]), "mean_ms": round2(mean), "max_ms": round2(samples[samples.len() - 1])}));
    }
    println!("{}", serde_json::Value::Object(rows));
    Ok(())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "sealvol bench needs root: it creates loop devices and mounts"
    );
    let bytes = parse_bytes(&args.size)?;
    let exe = std::env::current_exe().context("locating the sealvol binary")?;
    if args.fio {
        return fio_compare(&exe, &args).await;
    }
    if args.revocation {
        return revocation_figures(&exe, &args).await;
    }
    if args.backups {
        return snapshots::run_backups(&exe, &args).await;
    }
    let scratch = ScratchNode::new(&exe, args.dir.as_deref())?;
    let (mut node, mut setup) = if args.key_mode == "none" {
        let params = vec![("keyMode".to_string(), "none".to_string())];
        (
            scratch,
            Setup {
                params,
                azure: None,
                republishes: args.republishes,
            },
        )
    } else {
        let extra: Vec<String> = args
            .reauthorize_interval
            .iter()
            .map(|i| format!("--reauthorize-interval={i}"))
            .collect();
        let (node, azure, vault) = with_emulator(&exe, scratch, &extra)?;
        let mut params = vec![
            ("keyMode".to_string(), args.key_mode.clone()),
            ("keyVaultURL".to_string(), vault),
            ("clientID".to_string(), crate::demo::APP_CLIENT.to_string()),
        ];
        if args.key_mode == "keyvault-secret" {
            params.push(("secretName".into(), "kek-secret".into()));
        } else {
            params.push(("keyName".into(), "kek".into()));
        }
        (
            node,
            Setup {
                params,
                azure: Some(azure),
                republishes: args.republishes,
            },
        )
    };
    setup
        .params
        .push(("provisioning".to_string(), args.provisioning.clone()));
    let client = node.start(&[("SEALVOL_LOG", "warn")]).await?;
    if let Some(duration) = args.chaos {
        return chaos::run(node, client, setup, &args, bytes, duration).await;
    }
    if args.snapshots {
        return snapshots::run(node, client, setup, &args).await;
    }
    if args.foreign_mounts > 0 {
        return scale(node, client, setup, &args, bytes).await;
    }
    let node = Arc::new(node);
    let setup = Arc::new(setup);
    println!(
        "sealvol bench: {} lifecycles of {} {} volumes (keyMode {}), sequential then {} at once; pool in {}",
        args.volumes,
        args.size,
        args.provisioning,
        args.key_mode,
        args.concurrency,
        node.pool_dir.display()
    );
    let seq = phase(&node, &client, &setup, "seq", &args, 1, bytes).await;
    let conc = phase(
        &node,
        &client,
        &setup,
        "conc",
        &args,
        args.concurrency,
        bytes,
    )
    .await;
    let (entra_calls, keyvault_calls, keyvault_challenges) = match &setup.azure {
        Some(azure) => {
            let mut kv = 0;
            for route in ["keyvault.wrap", "keyvault.unwrap", "keyvault.get_secret"] {
                kv += azure.count(route, Some(200)).await;
            }
            let mut challenges = 0;
            for route in ["keyvault.wrap", "keyvault.unwrap", "keyvault.get_secret"] {
                challenges += azure.count(route, Some(401)).await;
            }
            (azure.count("entra.token", Some(200)).await, kv, challenges)
        }
        None => (0, 0, 0),
    };
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
            ("republish", &p.republish_ms),
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
    if setup.azure.is_some() {
        println!(
            "Entra ID exchanges {entra_calls} | Key Vault wrap/unwrap/get calls {keyvault_calls} | bearer challenges {keyvault_challenges} (re-authorization interval {})",
            args.reauthorize_interval.as_deref().unwrap_or("5m")
        );
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
        "republish_p50_ms": round2(percentile(&seq.republish_ms, 50.0)),
        "republish_p99_ms": round2(percentile(&seq.republish_ms, 99.0)),
        "reauthorize_interval": args.reauthorize_interval.clone().unwrap_or_else(|| "5m".into()),
        "entra_calls": entra_calls,
        "keyvault_calls": keyvault_calls,
        "keyvault_challenges": keyvault_challenges,
        "errors": seq.errors + conc.errors,
        "leaked_loop_devices": leaked_loops,
        "leaked_mounts": leaked_mounts,
        "leftover_pool_files": leftover_files,
        "rss_max_kib": rss,
    });
    println!("{json}");
    Ok(())
}

/// Unrelated tmpfs mounts below `dir`, unmounted when dropped.
struct ForeignMounts(Vec<std::path::PathBuf>);

impl ForeignMounts {
    fn mount(dir: &std::path::Path, n: usize) -> anyhow::Result<ForeignMounts> {
        let mut mounts = ForeignMounts(Vec::with_capacity(n));
        for i in 0..n {
            let at = dir.join(format!("foreign-{i}"));
            std::fs::create_dir_all(&at).with_context(|| format!("mkdir {}", at.display()))?;
            nix::mount::mount(
                Some("tmpfs"),
                &at,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some("size=64k"),
            )
            .with_context(|| format!("mount tmpfs at {}", at.display()))?;
            mounts.0.push(at);
        }
        Ok(mounts)
    }
}

impl Drop for ForeignMounts {
    fn drop(&mut self) {
        for at in self.0.drain(..).rev() {
            let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&at);
        }
    }
}

/// `--foreign-mounts`: volumes made ready one by one and kept published among many unrelated
/// mounts; then one republish of each; then teardown.
async fn scale(
    mut node: ScratchNode,
    mut client: CsiClient,
    setup: Setup,
    args: &BenchArgs,
    bytes: i64,
) -> anyhow::Result<()> {
    let foreign = ForeignMounts::mount(&node.root.join("foreign"), args.foreign_mounts)?;
    println!(
        "sealvol bench: {} foreign mounts, then {} volumes of {} (keyMode {}) made ready one by one and kept published",
        args.foreign_mounts, args.volumes, args.size, args.key_mode
    );
    let token = pod_token(&setup).await?;
    let mut ready_ms = Vec::with_capacity(args.volumes);
    // Per step (create, stage, publish), to see which one grows.
    let mut steps_ms: [Vec<f64>; 3] = Default::default();
    let mut published = Vec::with_capacity(args.volumes);
    for i in 0..args.volumes {
        let (name, pod) = (format!("scale-{i}"), format!("pod-scale-{i}"));
        let (id, publish, steps) = make_ready(
            &mut client,
            &node,
            &setup,
            token.as_deref(),
            &name,
            &pod,
            bytes,
        )
        .await?;
        ready_ms.push(steps.iter().sum::<Duration>().as_secs_f64() * 1000.0);
        for (v, d) in steps_ms.iter_mut().zip(steps) {
            v.push(d.as_secs_f64() * 1000.0);
        }
        published.push((id, pod, publish));
    }
    let mut republish_ms = Vec::with_capacity(published.len());
    for (_, _, publish) in &published {
        let start = Instant::now();
        client.node.node_publish_volume(publish.clone()).await?;
        republish_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let mut teardown_ms = Vec::with_capacity(published.len());
    for (id, pod, _) in published {
        let start = Instant::now();
        teardown(&mut client, &node, id, &pod).await?;
        teardown_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    drop(foreign);
    let tenth = (ready_ms.len() / 10).max(1);
    let mut first: Vec<f64> = ready_ms[..tenth].to_vec();
    let mut last: Vec<f64> = ready_ms[ready_ms.len() - tenth..].to_vec();
    for v in [&mut first, &mut last, &mut republish_ms, &mut teardown_ms] {
        v.sort_by(f64::total_cmp);
    }
    let (first_p50, last_p50) = (percentile(&first, 50.0), percentile(&last, 50.0));
    println!();
    println!("{:<44} {:>9} {:>9}", "step", "p50 ms", "p99 ms");
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        format!("ready, first {tenth} volumes"),
        first_p50,
        percentile(&first, 99.0)
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        format!("ready, last {tenth} volumes"),
        last_p50,
        percentile(&last, 99.0)
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        format!("republish, {} kept published", republish_ms.len()),
        percentile(&republish_ms, 50.0),
        percentile(&republish_ms, 99.0)
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "teardown",
        percentile(&teardown_ms, 50.0),
        percentile(&teardown_ms, 99.0)
    );
    for (step, v) in ["create", "stage", "publish"].iter().zip(&steps_ms) {
        let p50 = |part: &[f64]| {
            let mut part = part.to_vec();
            part.sort_by(f64::total_cmp);
            percentile(&part, 50.0)
        };
        println!(
            "{:<44} {:>9.2} {:>9.2}",
            format!("{step}, first / last {tenth} p50"),
            p50(&v[..tenth]),
            p50(&v[v.len() - tenth..])
        );
    }
    println!(
        "ready growth (last / first p50): {:.2}x",
        last_p50 / first_p50.max(1e-9)
    );
    let leaks = (
        node.loop_devices().len(),
        node.mounts().len(),
        node.pool_files().len(),
    );
    println!(
        "leaked loop devices {} | leaked mounts {} | leftover pool files {}",
        leaks.0, leaks.1, leaks.2
    );
    println!(
        "{}",
        serde_json::json!({
            "foreign_mounts": args.foreign_mounts,
            "volumes": args.volumes,
            "ready_first_p50_ms": round2(first_p50),
            "ready_last_p50_ms": round2(last_p50),
            "ready_growth": round2(last_p50 / first_p50.max(1e-9)),
            "republish_p50_ms": round2(percentile(&republish_ms, 50.0)),
            "republish_p99_ms": round2(percentile(&republish_ms, 99.0)),
            "teardown_p50_ms": round2(percentile(&teardown_ms, 50.0)),
            "leaked_loop_devices": leaks.0,
            "leaked_mounts": leaks.1,
            "leftover_pool_files": leaks.2,
        })
    );
    node.kill();
    Ok(())
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
