//! `sealvol bench --snapshots`: how long a snapshot and a restore take against the data a
//! volume holds (64 MiB, 512 MiB, 2 GiB written), next to `cp --sparse=always` of the same
//! volume file on the same pool, the plain copy a snapshot is measured against. The page cache
//! is dropped before each timed copy, so each reads from the disk. With `--backups`: the same
//! sizes backed up to Blob storage (Azurite behind the Azure emulator's gateway) and restored
//! on a second node.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{BenchArgs, Setup, make_ready, pod_token, teardown};
use sealvol::client::CsiClient;
use sealvol::harness::azure::EmulatorProcess;
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
        let id = volume_with_data(
            &mut client,
            &node,
            &setup,
            token.as_deref(),
            &name,
            &pod,
            written,
        )
        .await?;

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

        let (restored, restore_time) =
            timed_restore(&mut client, &name, written + 256 * MIB, &params, &snapshot).await?;

        let cp_time = cp_sparse(&node, &id).await?;

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

/// The driver's own identity in the benchmark's emulator: a Blob role, no Key Vault role.
const DRIVER_CLIENT: &str = "0b5e1c3a-1111-4111-8111-00000000dd30";
const DRIVER_OID: &str = "7d2a9e4f-2222-4222-8222-00000000dd30";
const ACCOUNT: &str = "benchaccount";
const CONTAINER: &str = "backups";

struct BackupRow {
    written: i64,
    /// CreateSnapshot until it reports ready: the local copy and the upload.
    backup: Duration,
    /// CreateVolume from it on another node: the download.
    restore: Duration,
    cp: Duration,
}

/// `sealvol bench --snapshots --backups`: backup to Blob storage (Azurite behind the emulator's
/// gateway, over HTTPS on loopback) and restore on a second node, against `cp --sparse=always`.
pub(super) async fn run_backups(exe: &std::path::Path, args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.key_mode != "none",
        "--backups needs an encrypted keyMode: keyMode none volumes are not backed up"
    );
    let first = ScratchNode::new(exe, args.dir.as_deref())?;
    let second = ScratchNode::new(exe, args.dir.as_deref())?;
    let mut config =
        crate::demo::emulator_config(&[(crate::demo::APP_CLIENT, crate::demo::APP_OID, "app")]);
    let scope = format!("/storageAccounts/{ACCOUNT}/containers/{CONTAINER}");
    config["tenants"][0]["identities"]
        .as_array_mut()
        .context("the emulator config has no identities")?
        .push(serde_json::json!({"name": "sealvol-node", "client_id": DRIVER_CLIENT, "object_id": DRIVER_OID,
            "federated_credentials": [{"name": "node", "issuer": "{emulator}/issuers/cluster",
                "subject": "system:serviceaccount:kube-system:sealvol-node"}]}));
    config["role_assignments"]
        .as_array_mut()
        .context("the emulator config has no role assignments")?
        .push(serde_json::json!({"principal": DRIVER_OID, "role": "Storage Blob Data Contributor", "scope": scope}));
    config["storage_accounts"] = serde_json::json!([{"name": ACCOUNT, "containers": [CONTAINER]}]);
    let azure = EmulatorProcess::start(exe, &first.root, &config)?;
    let container = format!(
        "{}/{CONTAINER}",
        azure
            .blob_url(ACCOUNT)
            .context("the emulator serves no Blob account")?
    );
    let vault = azure.vault_url("demo-kv").context("no vault")?.to_string();
    let driver_token = azure
        .mint_token("cluster", "kube-system", "sealvol-node")
        .await?;
    let mut nodes = Vec::new();
    for scratch in [first, second] {
        let token_file = scratch.root.join("driver-token");
        std::fs::write(&token_file, &driver_token).context("writing the driver's token")?;
        let mut flags = azure.node_args(crate::demo::TENANT);
        flags.push(format!("--backup-url={container}"));
        flags.push(format!("--backup-client-id={DRIVER_CLIENT}"));
        flags.push(format!("--backup-token-file={}", token_file.display()));
        let mut node = scratch.with_args(&flags.iter().map(String::as_str).collect::<Vec<_>>());
        let client = node.start(&[("SEALVOL_LOG", "warn")]).await?;
        nodes.push((node, client));
    }
    let mut params = vec![
        ("keyMode".to_string(), args.key_mode.clone()),
        ("keyVaultURL".to_string(), vault),
        ("clientID".to_string(), crate::demo::APP_CLIENT.to_string()),
        ("provisioning".to_string(), args.provisioning.clone()),
    ];
    if args.key_mode == "keyvault-secret" {
        params.push(("secretName".into(), "kek-secret".into()));
    } else {
        params.push(("keyName".into(), "kek".into()));
    }
    let param_refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let setup = Setup {
        params: params.clone(),
        azure: None,
        republishes: 0,
    };
    let token = azure.mint_token("cluster", "demo", "app").await?;
    println!(
        "sealvol bench --snapshots --backups: keyMode {}, {}; a volume per size, data written and synced, then CreateSnapshot with a backupURL until ready (local copy and upload to Azurite behind the emulator's Blob gateway, HTTPS on loopback), CreateVolume from it on a second node (download), and cp --sparse=always of the volume file",
        args.key_mode, args.provisioning
    );
    let (mut b_node, mut b_client) = nodes.pop().context("no second node")?;
    let (a_node, mut a_client) = nodes.pop().context("no first node")?;
    let mut rows = Vec::new();
    for (i, written) in WRITTEN.into_iter().enumerate() {
        let (name, pod) = (format!("backupbench-{i}"), format!("pod-backupbench-{i}"));
        let size = written + 256 * MIB;
        let id = volume_with_data(
            &mut a_client,
            &a_node,
            &setup,
            Some(&token),
            &name,
            &pod,
            written,
        )
        .await?;

        cold_cache()?;
        let request = csi::CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: format!("snap-{name}"),
            parameters: [("backupURL".to_string(), container.clone())].into(),
            ..Default::default()
        };
        let start = Instant::now();
        let snapshot = loop {
            let s = a_client
                .controller
                .create_snapshot(request.clone())
                .await?
                .into_inner()
                .snapshot
                .context("CreateSnapshot returned no snapshot")?;
            if s.ready_to_use {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let backup_time = start.elapsed();

        let (restored, restore_time) =
            timed_restore(&mut b_client, &name, size, &param_refs, &snapshot).await?;

        let cp_time = cp_sparse(&a_node, &id).await?;
        b_client
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: restored,
                secrets: Default::default(),
            })
            .await?;
        a_client
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snapshot.snapshot_id,
                secrets: Default::default(),
            })
            .await?;
        teardown(&mut a_client, &a_node, id, &pod).await?;
        rows.push(BackupRow {
            written,
            backup: backup_time,
            restore: restore_time,
            cp: cp_time,
        });
    }
    b_node.kill();
    println!();
    println!(
        "{:>10} {:>12} {:>12} {:>14} {:>12} {:>12} {:>14}",
        "written",
        "backup ms",
        "restore ms",
        "cp --sparse ms",
        "backup MB/s",
        "restore MB/s",
        "cp / backup"
    );
    for r in &rows {
        println!(
            "{:>10} {:>12.1} {:>12.1} {:>14.1} {:>12.0} {:>12.0} {:>14.2}",
            format!("{} MiB", r.written / MIB),
            ms(r.backup),
            ms(r.restore),
            ms(r.cp),
            r.written as f64 / 1e6 / r.backup.as_secs_f64(),
            r.written as f64 / 1e6 / r.restore.as_secs_f64(),
            r.cp.as_secs_f64() / r.backup.as_secs_f64()
        );
    }
    let json = serde_json::json!({
        "key_mode": args.key_mode,
        "rows": rows.iter().map(|r| serde_json::json!({
            "written_mib": r.written / MIB,
            "backup_ms": (ms(r.backup) * 10.0).round() / 10.0,
            "restore_from_blob_ms": (ms(r.restore) * 10.0).round() / 10.0,
            "cp_sparse_ms": (ms(r.cp) * 10.0).round() / 10.0,
        })).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}

/// A volume `name` of `written` + 256 MiB published to `pod`, with `written` bytes in its file
/// `data`, synced.
async fn volume_with_data(
    client: &mut CsiClient,
    node: &ScratchNode,
    setup: &Setup,
    token: Option<&str>,
    name: &str,
    pod: &str,
    written: i64,
) -> anyhow::Result<String> {
    let (id, _, _) = make_ready(client, node, setup, token, name, pod, written + 256 * MIB).await?;
    let target = node.target_path(pod, &id);
    tokio::task::block_in_place(|| fill(&format!("{target}/data"), written))?;
    Ok(id)
}

/// CreateVolume `restored-{name}` of `bytes` from `snapshot`, from a cold cache: the new
/// volume's id and how long the call took.
async fn timed_restore(
    client: &mut CsiClient,
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
    snapshot: &csi::Snapshot,
) -> anyhow::Result<(String, Duration)> {
    let mut req = requests::create(&format!("restored-{name}"), bytes, params);
    req.volume_content_source = Some(csi::VolumeContentSource {
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
        .create_volume(req)
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?
        .volume_id;
    Ok((restored, start.elapsed()))
}

/// `cp --sparse=always` of volume `id`'s file on `node`'s pool, synced, from a cold cache.
async fn cp_sparse(node: &ScratchNode, id: &str) -> anyhow::Result<Duration> {
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
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&copy);
    anyhow::ensure!(status.success(), "cp --sparse=always failed: {status}");
    synced.context("syncing the cp copy")?;
    Ok(elapsed)
}
