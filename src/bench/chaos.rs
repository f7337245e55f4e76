//! `sealvol bench --chaos DURATION`: lifecycles run by several workers at once, each writing
//! checksummed data into its volume, while the node plugin is killed (as `kill -9`) and
//! restarted at random moments; a few resident volumes stay published throughout. Calls that
//! meet a dead or restarting plugin are retried as kubelet retries them. At the end every
//! resident volume's data is checked and everything is torn down; the report counts
//! lifecycles, kills survived, data checked, data lost, errors and leaks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sealvol::client::CsiClient;
use sealvol::harness::ScratchNode;
use sealvol::proto::csi::v1 as csi;
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;
use tonic::Code;

use super::{BenchArgs, Setup, make_ready, pod_token};

/// Files each volume gets, and their size.
const FILES: usize = 4;
const FILE_BYTES: usize = 1 << 20;
/// Volumes published for the whole run.
const RESIDENTS: usize = 3;
/// How long one call is retried while the plugin is down.
const CALL_DEADLINE: Duration = Duration::from_secs(60);

struct Shared {
    /// Read to build requests; written (and held) while the plugin is killed and restarted.
    node: RwLock<ScratchNode>,
    client: Mutex<CsiClient>,
    stop: AtomicBool,
    lifecycles: AtomicU64,
    files_checked: AtomicU64,
    lost: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn client(&self) -> CsiClient {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What a call meets while the plugin is down or restarting, or busy with a call it restarted
/// in the middle of: kubelet retries these.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Aborted | Code::Cancelled
    )
}

/// Runs `call` with the current client until it succeeds, fails for good, or the deadline.
async fn retried<T, F, Fut>(shared: &Shared, what: &str, call: F) -> anyhow::Result<T>
where
    F: Fn(CsiClient) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + CALL_DEADLINE;
    loop {
        match call(shared.client()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if retryable(&s) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => bail!("{what}: {:?}: {}", s.code(), s.message()),
        }
    }
}

/// Writes `FILES` files of random data into `dir`, synced; returns their digests.
fn write_files(dir: &str) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut digests = Vec::with_capacity(FILES);
    let mut data = vec![0u8; FILE_BYTES];
    for i in 0..FILES {
        aws_lc_rs::rand::fill(&mut data).map_err(|_| anyhow::anyhow!("the OS RNG failed"))?;
        let path = format!("{dir}/chaos-{i}");
        std::fs::write(&path, &data).with_context(|| format!("write {path}"))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("fsync {path}"))?;
        digests.push(Sha256::digest(&data).into());
    }
    Ok(digests)
}

/// Checks the files of `dir` against `digests`; counts each file checked and each lost.
fn check_files(shared: &Shared, dir: &str, digests: &[[u8; 32]]) {
    for (i, want) in digests.iter().enumerate() {
        let path = format!("{dir}/chaos-{i}");
        let ok = std::fs::read(&path)
            .map(|data| Sha256::digest(&data).as_slice() == want)
            .unwrap_or(false);
        shared.files_checked.fetch_add(1, Ordering::Relaxed);
        if !ok {
            shared.lost.fetch_add(1, Ordering::Relaxed);
            eprintln!("chaos: {path} is missing or damaged");
        }
    }
}

/// One volume's life: ready, data written, republished and checked, torn down.
async fn lifecycle(shared: &Shared, setup: &Setup, name: &str, bytes: i64) -> anyhow::Result<()> {
    let pod = format!("pod-{name}");
    let token = pod_token(setup).await?;
    let (id, publish) = ready(shared, setup, token.as_deref(), name, &pod, bytes).await?;
    let target = shared.node.read().await.target_path(&pod, &id);
    let digests = write_files(&target)?;
    retried(shared, "republish", |mut c| {
        let req = publish.clone();
        async move { c.node.node_publish_volume(req).await }
    })
    .await?;
    check_files(shared, &target, &digests);
    take_down(shared, &id, &pod).await
}

/// Create, stage and publish, each retried while the plugin is down.
async fn ready(
    shared: &Shared,
    setup: &Setup,
    token: Option<&str>,
    name: &str,
    pod: &str,
    bytes: i64,
) -> anyhow::Result<(String, csi::NodePublishVolumeRequest)> {
    let deadline = Instant::now() + CALL_DEADLINE;
    loop {
        let mut client = shared.client();
        let attempt = {
            let node = shared.node.read().await;
            make_ready(&mut client, &node, setup, token, name, pod, bytes).await
        };
        match attempt {
            Ok((id, publish, _)) => return Ok((id, publish)),
            Err(e)
                if Instant::now() < deadline
                    && e.downcast_ref::<tonic::Status>().is_some_and(retryable) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context(format!("making {name} ready"))),
        }
    }
}

/// Unpublish, unstage and delete, each retried while the plugin is down.
async fn take_down(shared: &Shared, id: &str, pod: &str) -> anyhow::Result<()> {
    let (unpublish, unstage) = {
        let node = shared.node.read().await;
        (node.unpublish(id, pod), node.unstage(id))
    };
    retried(shared, "unpublish", |mut c| {
        let req = unpublish.clone();
        async move { c.node.node_unpublish_volume(req).await }
    })
    .await?;
    retried(shared, "unstage", |mut c| {
        let req = unstage.clone();
        async move { c.node.node_unstage_volume(req).await }
    })
    .await?;
    retried(shared, "delete", |mut c| {
        let req = csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: Default::default(),
        };
        async move { c.controller.delete_volume(req).await }
    })
    .await?;
    Ok(())
}

/// A small xorshift for kill timing: not for keys.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

pub(super) async fn run(
    node: ScratchNode,
    client: CsiClient,
    setup: Setup,
    args: &BenchArgs,
    bytes: i64,
    duration: Duration,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        node: RwLock::new(node),
        client: Mutex::new(client),
        stop: AtomicBool::new(false),
        lifecycles: AtomicU64::new(0),
        files_checked: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let setup = Arc::new(setup);
    let workers = args.concurrency.clamp(1, 8);
    println!(
        "sealvol bench --chaos: {:?} of lifecycles by {workers} workers with {RESIDENTS} volumes published throughout, keyMode {}, {} {}; the node plugin killed and restarted every 1 to 5 s",
        duration, args.key_mode, args.size, args.provisioning
    );

    // The residents: published for the whole run, their data checked after every restart.
    let mut residents = Vec::with_capacity(RESIDENTS);
    for i in 0..RESIDENTS {
        let (name, pod) = (format!("resident-{i}"), format!("pod-resident-{i}"));
        let token = pod_token(&setup).await?;
        let (id, publish) = ready(&shared, &setup, token.as_deref(), &name, &pod, bytes).await?;
        let target = shared.node.read().await.target_path(&pod, &id);
        let digests = write_files(&target)?;
        residents.push((id, pod, publish, target, digests));
    }

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (shared, setup) = (Arc::clone(&shared), Arc::clone(&setup));
        tasks.spawn(async move {
            let mut n = 0;
            while !shared.stop.load(Ordering::Relaxed) {
                let name = format!("chaos-{w}-{n}");
                n += 1;
                match lifecycle(&shared, &setup, &name, bytes).await {
                    Ok(()) => {
                        shared.lifecycles.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("chaos: {name}: {e:#}");
                    }
                }
            }
        });
    }

    let mut kills = 0u64;
    let mut rng = started.elapsed().as_nanos() as u64 | 1;
    rng ^= std::process::id() as u64;
    while started.elapsed() < duration {
        let pause = Duration::from_millis(1000 + next_random(&mut rng) % 4000);
        tokio::time::sleep(pause.min(duration.saturating_sub(started.elapsed()))).await;
        if started.elapsed() >= duration {
            break;
        }
        {
            let mut node = shared.node.write().await;
            node.kill();
            let client = node
                .start(&[])
                .await
                .context("restarting the node plugin")?;
            *shared.client.lock().unwrap_or_else(|p| p.into_inner()) = client;
        }
        kills += 1;
        // kubelet's periodic republish of the residents, then their data.
        for (_, _, publish, target, digests) in &residents {
            let req = publish.clone();
            if let Err(e) = retried(&shared, "resident republish", |mut c| {
                let req = req.clone();
                async move { c.node.node_publish_volume(req).await }
            })
            .await
            {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("chaos: {e:#}");
            }
            check_files(&shared, target, digests);
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("chaos: a worker failed: {e}");
        }
    }
    for (id, pod, _, target, digests) in &residents {
        check_files(&shared, target, digests);
        if let Err(e) = take_down(&shared, id, pod).await {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("chaos: {e:#}");
        }
    }
    let node = shared.node.read().await;
    let leaks = (
        node.loop_devices().len(),
        node.mounts().len(),
        node.pool_files().len(),
    );
    let checked = shared.files_checked.load(Ordering::Relaxed);
    let report = serde_json::json!({
        "duration_s": started.elapsed().as_secs(),
        "workers": workers,
        "lifecycles": shared.lifecycles.load(Ordering::Relaxed),
        "kills_survived": kills,
        "files_checked": checked,
        "mib_checked": (checked * FILE_BYTES as u64) >> 20,
        "lost": shared.lost.load(Ordering::Relaxed),
        "errors": shared.errors.load(Ordering::Relaxed),
        "leaked_loop_devices": leaks.0,
        "leaked_mounts": leaks.1,
        "leftover_pool_files": leaks.2,
    });
    println!(
        "lifecycles {} | kills survived {kills} | files checked {checked} ({} MiB) | lost {} | errors {} | leaked loop devices {} | leaked mounts {} | leftover pool files {}",
        report["lifecycles"],
        report["mib_checked"],
        report["lost"],
        report["errors"],
        leaks.0,
        leaks.1,
        leaks.2
    );
    println!("{report}");
    Ok(())
}
