//! `sealvol bench --snapshots`: how long a snapshot and a restore take against the data a
//! volume holds (64 MiB, 512 MiB, 2 GiB written), next to `cp --sparse=always` of the same
//! volume file on the same pool, the plain copy a snapshot is measured against. The page cache
//! is dropped before each timed copy, so each reads from the disk.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{BenchArgs, Setup, make_ready, pod_token, teardown};
use sealvol::client::CsiClient;
use sealvol::harness::{ScratchNode, requests};
use sealvol::proto::csi::v1 as csi;

const MIB: i64 = 1 << 20;
const WRITTEN: [i64; 3] = [64 * MIB, 512 * MIB, 2048 * MIB];

struct Row {
    written: i64,
    snapshot: Duration,
    restore: Duration,
    cp: Duration,
}

/// Writes dirty pages back and drops the clean ones, so that each timed copy reads from the
/// disk (whichever copy ran first would otherwise leave the next a warm cache).
fn cold_cache() -> anyhow::Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "1").context("dropping the page cache")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes `bytes` of a non-repeating pattern into `path` and syncs it.
fn fill(path: &str, bytes: i64) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("create {path}"))?;
    let mut chunk = vec![0u8; 8 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = bytes;
    while left > 0 {
        for b in chunk.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        let n = left.min(chunk.len() as i64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as i64;
    }
    f.sync_all()?;
    Ok(())
}

pub(super) async fn run(
    node: ScratchNode,
    mut client: CsiClient,
    setup: Setup,
    args: &BenchArgs,
) -> anyhow::Result<()> {
    println!(
        "sealvol bench --snapshots: keyMode {}, {}; a volume per size, data written and synced, then CreateSnapshot (staged: frozen around the copy), CreateVolume from it, and cp --sparse=always of the volume file",
        args.key_mode, args.provisioning
    );
    let params: Vec<(&str, &str)> = setup
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let token = pod_token(&setup).await?;
    let mut rows = Vec::new();
    for (i, written) in WRITTEN.into_iter().enumerate() {
        let (name, pod) = (format!("snapbench-{i}"), format!("pod-snapbench-{i}"));
        let (id, _, _) = make_ready(
            &mut client,
            &node,
            &setup,
            token.as_deref(),
            &name,
            &pod,
            written + 256 * MIB,
        )
        .await?;
        let target = node.target_path(&pod, &id);
        tokio::task::block_in_place(|| fill(&format!("{target}/data"), written))?;

        cold_cache()?;
        let start = Instant::now();
        let snapshot = client
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: format!("snap-{name}"),
                ..Default::default()
            })
            .await?
            .into_inner()
            .snapshot
            .context("CreateSnapshot returned no snapshot")?;
        let snapshot_time = start.elapsed();

        let mut restore_req =
            requests::create(&format!("restored-{name}"), written + 256 * MIB, &params);
        restore_req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snapshot.snapshot_id.clone(),
                },
            )),
        });
        cold_cache()?;
        let start = Instant::now();
        let restored = client
            .controller
            .create_volume(restore_req)
            .await?
            .into_inner()
            .volume
            .context("CreateVolume returned no volume")?
            .volume_id;
        let restore_time = start.elapsed();

        let file = node.pool_dir.join(format!("{id}.img"));
        let copy = node.pool_dir.join("cp-sparse-copy");
        cold_cache()?;
        let start = Instant::now();
        let status = tokio::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&file)
            .arg(&copy)
            .status()
            .await?;
        // cp returns before its data is on disk; the snapshot's copy was synced.
        let synced = std::fs::File::open(&copy).and_then(|f| f.sync_all());
        let cp_time = start.elapsed();
        let _ = std::fs::remove_file(&copy);
        anyhow::ensure!(status.success(), "cp --sparse=always failed: {status}");
        synced.context("syncing the cp copy")?;

        client
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: restored,
                secrets: Default::default(),
            })
            .await?;
        client
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snapshot.snapshot_id,
                secrets: Default::default(),
            })
            .await?;
        teardown(&mut client, &node, id, &pod).await?;
        rows.push(Row {
            written,
            snapshot: snapshot_time,
            restore: restore_time,
            cp: cp_time,
        });
    }
    println!();
    println!(
        "{:>10} {:>12} {:>12} {:>14} {:>14} {:>16}",
        "written", "snapshot ms", "restore ms", "cp --sparse ms", "snapshot MB/s", "cp / snapshot"
    );
    for r in &rows {
        println!(
            "{:>10} {:>12.1} {:>12.1} {:>14.1} {:>14.0} {:>16.2}",
            format!("{} MiB", r.written / MIB),
            ms(r.snapshot),
            ms(r.restore),
            ms(r.cp),
            r.written as f64 / 1e6 / r.snapshot.as_secs_f64(),
            r.cp.as_secs_f64() / r.snapshot.as_secs_f64()
        );
    }
    let json = serde_json::json!({
        "key_mode": args.key_mode,
        "rows": rows.iter().map(|r| serde_json::json!({
            "written_mib": r.written / MIB,
            "snapshot_ms": (ms(r.snapshot) * 10.0).round() / 10.0,
            "restore_ms": (ms(r.restore) * 10.0).round() / 10.0,
            "cp_sparse_ms": (ms(r.cp) * 10.0).round() / 10.0,
        })).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}
