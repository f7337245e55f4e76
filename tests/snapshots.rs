//! Snapshots, restores and clones, on the volume's node: a snapshot of a published volume taken
//! while a writer runs restores exactly the data written before it; the snapshot holds
//! ciphertext and the wrapped DEK only, and the restored volume opens for an authorized identity
//! and for no other; a larger restore grows its filesystem; a clone copies a live volume;
//! snapshots count in the pool and delete wipes them. A driver killed mid-snapshot leaves the
//! volume thawed and no half snapshot; a copy that outlasts the freeze limit gives up cleanly.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use common::azure::*;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn snapshot_request(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn take_snapshot(c: &mut CsiClient, name: &str, source: &str) -> csi::Snapshot {
    c.controller
        .create_snapshot(snapshot_request(name, source))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}

/// A CreateVolume of `bytes` from `source` with `params`.
fn create_from(
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
    source: csi::volume_content_source::Type,
) -> csi::CreateVolumeRequest {
    let mut req = requests::create(name, bytes, params);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

fn from_snapshot(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn from_volume(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

async fn stage_and_publish(node: &ScratchNode, c: &mut CsiClient, id: &str, pod: &str) {
    c.node.node_stage_volume(node.stage(id)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(id, pod))
        .await
        .unwrap();
}

/// Appends 64 KiB records, each synced, to `path` until `stop`; returns what it wrote.
fn writer(path: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&path).unwrap();
        let mut written = Vec::new();
        let mut n = 0u8;
        while !stop.load(Ordering::Relaxed) {
            let record = pattern(n, 64 << 10);
            f.write_all(&record).unwrap();
            f.sync_data().unwrap();
            written.extend_from_slice(&record);
            n = n.wrapping_add(1);
        }
        written
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_busy_volume_restores_what_was_written_before_it_to_its_identity_only() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let params = azure.params("keyvault-key");
    let params: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let src = create_with(&mut c, "pvc-src", 32 * MIB, &params).await;
    c.node.node_stage_volume(node.stage(&src)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &src, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    let target = node.target_path("a", &src);
    let before: Vec<Vec<u8>> = (0..4).map(|i| pattern(100 + i, 1 << 20)).collect();
    for (i, data) in before.iter().enumerate() {
        let mut f = std::fs::File::create(format!("{target}/before-{i}")).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    // A writer keeps going through the snapshot (it waits while the filesystem is frozen).
    let stop = Arc::new(AtomicBool::new(false));
    let live = writer(format!("{target}/live"), stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let snap = take_snapshot(&mut c, "snap-busy", &src).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let live = live.join().unwrap();
    assert_eq!(snap.source_volume_id, src);
    assert_eq!(snap.size_bytes, 32 * MIB);
    // The same request again is the same snapshot; the same name for another volume is not.
    let again = take_snapshot(&mut c, "snap-busy", &src).await;
    assert_eq!(again.snapshot_id, snap.snapshot_id);

    // The snapshot file holds ciphertext and the wrapped DEK: no plaintext, no key.
    let snap_file = node.pool_dir.join(format!("{}.snap", snap.snapshot_id));
    let bytes = std::fs::read(&snap_file).unwrap();
    for data in &before {
        assert!(
            !contains(&bytes, &data[..4096]),
            "plaintext in the snapshot"
        );
    }
    assert!(
        !contains(&bytes, b"before-0"),
        "a file name in the snapshot"
    );

    // Restored, and opened by the same identity at another pod.
    let restored = c
        .controller
        .create_volume(create_from(
            "pvc-restored",
            32 * MIB,
            &params,
            from_snapshot(&snap.snapshot_id),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let rid = restored.volume_id;
    // The same name again, without the source (or with another), is another volume.
    let s = refused(
        c.controller
            .create_volume(requests::create("pvc-restored", 32 * MIB, &params))
            .await,
    );
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    c.node.node_stage_volume(node.stage(&rid)).await.unwrap();
    // Another identity gets nothing.
    let s = refused(
        c.node
            .node_publish_volume(publish_as(
                &node,
                &rid,
                "x",
                &azure.token("intruder"),
                "intruder",
            ))
            .await,
    );
    assert!(
        matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
        "{s:?}"
    );
    assert!(!is_mounted(&node.target_path("x", &rid)));
    c.node
        .node_publish_volume(publish_as(&node, &rid, "b", &azure.token("app"), "app"))
        .await
        .unwrap();
    let restored_target = node.target_path("b", &rid);
    for (i, data) in before.iter().enumerate() {
        assert!(
            std::fs::read(format!("{restored_target}/before-{i}")).unwrap() == *data,
            "before-{i} differs"
        );
    }
    // What the writer had at the freeze: a prefix of what it wrote, whole records only.
    let at_snapshot = std::fs::read(format!("{restored_target}/live")).unwrap();
    assert!(at_snapshot.len() <= live.len());
    assert_eq!(at_snapshot[..], live[..at_snapshot.len()]);
    assert!(
        at_snapshot.len() < live.len(),
        "the writer wrote after the snapshot"
    );

    // A StorageClass with another key mode cannot restore it.
    let s = refused(
        c.controller
            .create_volume(create_from(
                "pvc-plain",
                32 * MIB,
                NONE,
                from_snapshot(&snap.snapshot_id),
            ))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("keyMode"), "{}", s.message());

    // Delete wipes the snapshot; the restored volume lives on.
    c.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!snap_file.exists());
    teardown(&node, &mut c, &rid, "b").await;
    teardown(&node, &mut c, &src, "a").await;
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_larger_restores_listing_and_capacity() {
    let (node, mut c) = start().await;
    let (src, _) = ready(&node, &mut c, "pvc-src", 32 * MIB, "a").await;
    let data = pattern(7, 8 << 20);
    {
        let mut f = std::fs::File::create(format!("{}/data", node.target_path("a", &src))).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let free_before = available_capacity(&c).await;
    let snap = take_snapshot(&mut c, "snap-1", &src).await;
    let free_after = available_capacity(&c).await;
    // The thick volume's reservation is not copied: only what was written (8 MiB of data,
    // plus the filesystem's metadata and journal).
    let snap_file = node.pool_dir.join(format!("{}.snap", snap.snapshot_id));
    let allocated = allocated_bytes(&snap_file);
    assert!(
        allocated < 20 * MIB as u64,
        "the snapshot of a thick 32 MiB volume holding 8 MiB allocates {allocated} bytes"
    );
    assert!(
        free_before - free_after >= 8 * MIB,
        "the snapshot's data counts in the pool: {free_before} -> {free_after}"
    );

    // Listed by id and by source; got by id; an unknown id is NOT_FOUND.
    let list = |snapshot_id: &str, source: &str| csi::ListSnapshotsRequest {
        snapshot_id: snapshot_id.into(),
        source_volume_id: source.into(),
        ..Default::default()
    };
    for req in [list(&snap.snapshot_id, ""), list("", &src), list("", "")] {
        let entries = c
            .controller
            .list_snapshots(req)
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].snapshot.as_ref().unwrap().snapshot_id,
            snap.snapshot_id
        );
    }
    let other = VolumeIds::other_snapshot();
    let entries = c
        .controller
        .list_snapshots(list(&other, ""))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(entries.is_empty());
    let got = c
        .controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, snap);
    let s = refused(
        c.controller
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: other,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(s.code(), Code::NotFound);

    // Restored twice as large: the filesystem grows to it at the first stage.
    let big = c
        .controller
        .create_volume(create_from(
            "pvc-big",
            64 * MIB,
            NONE,
            from_snapshot(&snap.snapshot_id),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(big.capacity_bytes, 64 * MIB);
    stage_and_publish(&node, &mut c, &big.volume_id, "b").await;
    let big_target = node.target_path("b", &big.volume_id);
    assert!(std::fs::read(format!("{big_target}/data")).unwrap() == data);
    let total = nix::sys::statvfs::statvfs(big_target.as_str()).unwrap();
    let bytes = total.blocks() * total.fragment_size();
    assert!(
        bytes > 48 * MIB as u64,
        "filesystem of {bytes} bytes not grown"
    );

    // A clone of the live volume, frozen around the copy.
    let clone = c
        .controller
        .create_volume(create_from("pvc-clone", 32 * MIB, NONE, from_volume(&src)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    stage_and_publish(&node, &mut c, &clone.volume_id, "c").await;
    assert!(
        std::fs::read(format!("{}/data", node.target_path("c", &clone.volume_id))).unwrap() == data
    );

    // A snapshot name reused for another volume is ALREADY_EXISTS; an unknown source NOT_FOUND.
    let s = refused(
        c.controller
            .create_snapshot(snapshot_request("snap-1", &clone.volume_id))
            .await,
    );
    assert_eq!(s.code(), Code::AlreadyExists);
    let s = refused(
        c.controller
            .create_snapshot(snapshot_request(
                "snap-2",
                "sv-0123456789abcdef0123456789abcdef",
            ))
            .await,
    );
    assert_eq!(s.code(), Code::NotFound);

    // Deleting twice is fine; a malformed id deletes nothing and succeeds.
    for id in [snap.snapshot_id.as_str(), snap.snapshot_id.as_str(), "../x"] {
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for (id, pod) in [(&big.volume_id, "b"), (&clone.volume_id, "c"), (&src, "a")] {
        teardown(&node, &mut c, id, pod).await;
    }
    assert_clean(&node);
}

/// Whether a write into `dir` completes within `within` (a frozen filesystem blocks it).
fn writable_within(dir: &str, within: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = format!("{dir}/probe");
    std::thread::spawn(move || {
        let ok =
            std::fs::write(&path, b"probe").and_then(|_| std::fs::File::open(&path)?.sync_all());
        let _ = tx.send(ok.is_ok());
    });
    rx.recv_timeout(within).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_killed_while_the_volume_is_frozen_thaws_it_at_start() {
    for point in ["snapshot.frozen", "snapshot.before_rename"] {
        let (mut node, mut c) = start_with(&[], &[("SEALVOL_CRASH_AT", point)]).await;
        let (id, target) = ready(&node, &mut c, "pvc-crash", 32 * MIB, "a").await;
        assert!(
            c.controller
                .create_snapshot(snapshot_request("snap-crash", &id))
                .await
                .is_err(),
            "{point}: no crash"
        );
        drop(c);
        node.kill();
        if point == "snapshot.frozen" {
            // Died with the filesystem frozen: writers wait until the restart thaws it.
            assert!(
                !writable_within(&target, Duration::from_secs(1)),
                "the snapshot did not freeze the volume"
            );
        }
        let mut c = node.start(&[]).await.unwrap();
        assert!(
            writable_within(&target, Duration::from_secs(10)),
            "{point}: the volume stayed frozen"
        );
        let leftovers: Vec<String> = node
            .pool_files()
            .into_iter()
            .filter(|f| f.contains(".snap"))
            .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
        let listed = c
            .controller
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert!(listed.is_empty(), "{point}: a half snapshot is listed");
        // The retry completes.
        let snap = take_snapshot(&mut c, "snap-crash", &id).await;
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await
            .unwrap();
        teardown(&node, &mut c, &id, "a").await;
        assert_clean(&node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_longer_than_the_freeze_limit_gives_up_and_thaws() {
    let (node, mut c) = start_with(&["--snapshot-freeze-limit=0s"], &[]).await;
    let (id, target) = ready(&node, &mut c, "pvc-slow", 32 * MIB, "a").await;
    std::fs::write(format!("{target}/data"), pattern(1, 4 << 20)).unwrap();
    let s = refused(
        c.controller
            .create_snapshot(snapshot_request("snap-slow", &id))
            .await,
    );
    assert_eq!(s.code(), Code::Aborted, "{s:?}");
    assert!(
        s.message().contains("--snapshot-freeze-limit"),
        "{}",
        s.message()
    );
    assert!(
        writable_within(&target, Duration::from_secs(10)),
        "left frozen"
    );
    assert!(node.pool_files().iter().all(|f| !f.contains(".snap")));
    teardown(&node, &mut c, &id, "a").await;
    assert_clean(&node);
}

/// Ids no test creates.
struct VolumeIds;

impl VolumeIds {
    fn other_snapshot() -> String {
        format!("ss-{}", "0".repeat(32))
    }
}

/// keyvault-secret seals the DEK bound to the volume's id: a restore keeps the source's seal,
/// so it must open it with the source's id, and a clone of the restore too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_mode_volume_restores_and_clones() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let params = azure.params("keyvault-secret");
    let params: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let src = create_with(&mut c, "pvc-secret-src", 32 * MIB, &params).await;
    c.node.node_stage_volume(node.stage(&src)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &src, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    std::fs::write(format!("{}/f", node.target_path("a", &src)), b"sealed").unwrap();
    nix::unistd::sync();
    let snap = take_snapshot(&mut c, "snap-secret", &src).await;
    let restored = c
        .controller
        .create_volume(create_from(
            "pvc-secret-restored",
            32 * MIB,
            &params,
            from_snapshot(&snap.snapshot_id),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let clone = c
        .controller
        .create_volume(create_from(
            "pvc-secret-clone",
            32 * MIB,
            &params,
            from_volume(&restored),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    for (id, pod) in [(&restored, "b"), (&clone, "c")] {
        c.node.node_stage_volume(node.stage(id)).await.unwrap();
        c.node
            .node_publish_volume(publish_as(&node, id, pod, &azure.token("app"), "app"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(format!("{}/f", node.target_path(pod, id))).unwrap(),
            b"sealed"
        );
    }
    c.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    for (id, pod) in [(&clone, "c"), (&restored, "b"), (&src, "a")] {
        teardown(&node, &mut c, id, pod).await;
    }
    assert_clean(&node);
}

/// A pool on tmpfs (no FIEMAP, no unwritten extents); paging through snapshots; a restore
/// whose filesystem has not grown yet, cloned, grows in the clone; a delete that dies after
/// its rename is finished by the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_pools_paging_pending_growth_and_an_interrupted_delete() {
    require_root();
    let mut node = ScratchNode::new(&binary(), None)
        .unwrap()
        .pool_on_tmpfs(512 << 20)
        .unwrap();
    let mut c = node
        .start(&[("SEALVOL_CRASH_AT", "delete.renamed")])
        .await
        .unwrap();
    let (src, target) = ready(&node, &mut c, "pvc-tmpfs", 32 * MIB, "a").await;
    let data = pattern(9, 4 << 20);
    std::fs::write(format!("{target}/data"), &data).unwrap();
    nix::unistd::sync();
    let first = take_snapshot(&mut c, "snap-a", &src).await;
    let second = take_snapshot(&mut c, "snap-b", &src).await;

    // Paging: one at a time, in id order, each token leading to the next.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .controller
            .list_snapshots(csi::ListSnapshotsRequest {
                max_entries: 1,
                starting_token: token.clone(),
                source_volume_id: src.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut expected = vec![first.snapshot_id.clone(), second.snapshot_id.clone()];
    expected.sort();
    assert_eq!(seen, expected);

    // Restored larger and never staged, then cloned at that size: the clone grows.
    let big = c
        .controller
        .create_volume(create_from(
            "pvc-big",
            64 * MIB,
            NONE,
            from_snapshot(&first.snapshot_id),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let clone = c
        .controller
        .create_volume(create_from(
            "pvc-big-clone",
            64 * MIB,
            NONE,
            from_volume(&big),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    stage_and_publish(&node, &mut c, &clone, "c").await;
    let clone_target = node.target_path("c", &clone);
    assert!(std::fs::read(format!("{clone_target}/data")).unwrap() == data);
    let st = nix::sys::statvfs::statvfs(clone_target.as_str()).unwrap();
    let bytes = st.blocks() * st.fragment_size();
    assert!(
        bytes > 48 * MIB as u64,
        "the clone's filesystem of {bytes} bytes did not grow"
    );

    // The delete dies after its rename; the retry wipes what the rename left.
    assert!(
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: second.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .is_err()
    );
    drop(c);
    node.kill();
    let mut c = node.start(&[]).await.unwrap();
    for id in [&second.snapshot_id, &first.snapshot_id] {
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let left: Vec<String> = node
        .pool_files()
        .into_iter()
        .filter(|f| f.starts_with("ss-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    teardown(&node, &mut c, &clone, "c").await;
    delete(&mut c, &big).await.unwrap();
    teardown(&node, &mut c, &src, "a").await;
    assert_clean(&node);
}
