//! `sealvol demo`: one volume's whole life on a scratch loop-file pool, each step printed with
//! its latency, and proof at the end that nothing was left behind.
//!
//! Until identity-gated encryption lands (keyMode keyvault-key), the volume is a plain one
//! (keyMode none): the steps and the clean-up are those of the real thing.

use std::time::Instant;

use anyhow::{Context, ensure};
use sealvol::harness::{ScratchNode, requests};
use sealvol::proto::csi::v1 as csi;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Capacity of the demo volume, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: i64,
}

struct Steps {
    start: Instant,
    n: usize,
}

impl Steps {
    fn begin(&mut self) {
        self.start = Instant::now();
    }

    fn done(&mut self, what: &str, detail: impl AsRef<str>) {
        self.n += 1;
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        println!(
            "{:>2}. {:<34} {:>9.2} ms  {}",
            self.n,
            what,
            ms,
            detail.as_ref()
        );
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "sealvol demo needs root: it creates loop devices and mounts"
    );
    let exe = std::env::current_exe().context("locating the sealvol binary")?;
    let mut steps = Steps {
        start: Instant::now(),
        n: 0,
    };
    let mut node = ScratchNode::new(&exe, None)?;
    let mut client = node.start(&[("SEALVOL_LOG", "warn")]).await?;
    steps.done(
        "start node plugin",
        format!("pool {}", node.pool_dir.display()),
    );

    steps.begin();
    let info = client
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await?
        .into_inner();
    let ready = client
        .identity
        .probe(csi::ProbeRequest {})
        .await?
        .into_inner()
        .ready;
    steps.done(
        "GetPluginInfo + Probe",
        format!(
            "{} {} ready={}",
            info.name,
            info.vendor_version,
            ready.unwrap_or(false)
        ),
    );

    steps.begin();
    let bytes = args.size_mib << 20;
    let volume = client
        .controller
        .create_volume(requests::create("demo-pvc", bytes, &[("keyMode", "none")]))
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let id = volume.volume_id.clone();
    steps.done(
        "CreateVolume",
        format!(
            "{id}, {} MiB, sparse file in the pool",
            volume.capacity_bytes >> 20
        ),
    );

    steps.begin();
    client.node.node_stage_volume(node.stage(&id)).await?;
    steps.done(
        "NodeStageVolume",
        "loop device (direct I/O), mkfs.ext4 -O encrypt, mount",
    );

    steps.begin();
    client
        .node
        .node_publish_volume(node.publish(&id, "demo-pod"))
        .await?;
    let target = node.target_path("demo-pod", &id);
    steps.done("NodePublishVolume", format!("bind mount at {target}"));

    steps.begin();
    let marker = "sealvol demo marker: hello from the pod";
    std::fs::write(format!("{target}/hello.txt"), marker).context("writing through the mount")?;
    let back = std::fs::read_to_string(format!("{target}/hello.txt"))?;
    ensure!(back == marker, "read back something else");
    steps.done("pod writes and reads a file", "hello.txt");

    steps.begin();
    let stats = client
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            staging_target_path: String::new(),
        })
        .await?
        .into_inner();
    let used = stats.usage.first().map(|u| u.used).unwrap_or(0);
    let abnormal = stats.volume_condition.map(|c| c.abnormal).unwrap_or(true);
    steps.done(
        "NodeGetVolumeStats",
        format!("{} KiB used, abnormal={abnormal}", used >> 10),
    );

    steps.begin();
    client
        .node
        .node_publish_volume(node.publish(&id, "demo-pod"))
        .await?;
    steps.done("NodePublishVolume again (republish)", "idempotent");

    steps.begin();
    client
        .node
        .node_unpublish_volume(node.unpublish(&id, "demo-pod"))
        .await?;
    steps.done("NodeUnpublishVolume", "target unmounted and removed");

    steps.begin();
    client.node.node_unstage_volume(node.unstage(&id)).await?;
    steps.done("NodeUnstageVolume", "unmounted, loop device released");

    steps.begin();
    client
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        })
        .await?;
    steps.done(
        "DeleteVolume",
        "header erased, blocks released (punch hole), file removed",
    );

    let (loops, mounts, files) = (node.loop_devices(), node.mounts(), node.pool_files());
    println!(
        "\nleft behind: {} loop devices, {} mounts, {} pool files",
        loops.len(),
        mounts.len(),
        files.len()
    );
    ensure!(
        loops.is_empty() && mounts.is_empty() && files.is_empty(),
        "the demo leaked: {loops:?} {mounts:?} {files:?}"
    );
    println!(
        "keyMode none: encryption with the pod's own identity arrives with the key issue (#4)."
    );
    Ok(())
}
