//! Thick volumes (the default) have their blocks reserved when they are created and grown, so
//! a pool filesystem filled by something else cannot fail their writes underneath ext4: every
//! write pattern succeeds with its data intact. `provisioning: thin` keeps sparse files.
//! ext4's `discard` is refused for a thick volume (it would punch its reservation away).

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::Write;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Fills the filesystem holding `dir` from outside the driver, until ENOSPC.
fn fill(dir: &std::path::Path) {
    let mut f = std::fs::File::create(dir.join("someone-elses-file")).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

async fn start_on_small_pool() -> (ScratchNode, CsiClient) {
    require_root();
    let mut node = ScratchNode::new(&binary(), None)
        .unwrap()
        .pool_on_tmpfs(160 << 20)
        .unwrap();
    let c = node.start(&[]).await.unwrap();
    (node, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thick_volume_keeps_every_write_when_the_pool_fills() {
    let (node, mut c) = start_on_small_pool().await;
    let id = create_with(&mut c, "pvc-thick", 64 * MIB, NONE).await;
    let file = node.pool_dir.join(format!("{id}.img"));
    assert!(
        allocated_bytes(&file) >= (64 + 1) * MIB as u64,
        "every block is reserved at create: {}",
        allocated_bytes(&file)
    );
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&id, "pod"))
        .await
        .unwrap();
    let target = node.target_path("pod", &id);

    fill(&node.pool_dir);

    // One write and fsync; many writes and one fsync; many writes without fsync (how build
    // tools and caches write), then the page cache flushed by sync(2).
    let one = pattern(1, 8 << 20);
    {
        let mut f = std::fs::File::create(format!("{target}/one")).unwrap();
        f.write_all(&one).unwrap();
        f.sync_all().unwrap();
    }
    let many = pattern(2, 16 << 20);
    {
        let mut f = std::fs::File::create(format!("{target}/many")).unwrap();
        for chunk in many.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let unsynced = pattern(3, 16 << 20);
    {
        let mut f = std::fs::File::create(format!("{target}/unsynced")).unwrap();
        for chunk in unsynced.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
    }
    nix::unistd::sync();

    // Read back from the device, not the page cache: unmount everything and mount again.
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&id, "pod"))
        .await
        .unwrap();
    for (name, data) in [("one", &one), ("many", &many), ("unsynced", &unsynced)] {
        assert!(
            std::fs::read(format!("{target}/{name}")).unwrap() == *data,
            "{name} came back damaged"
        );
    }
    // And ext4 recorded no error on the way.
    let loops = node.loop_devices();
    assert_eq!(loops.len(), 1, "{loops:?}");
    let name = loops[0].trim_start_matches("/dev/");
    let errors = std::fs::read_to_string(format!("/sys/fs/ext4/{name}/errors_count")).unwrap();
    assert_eq!(errors.trim(), "0", "ext4 errors on the thick volume");
    std::fs::remove_file(node.pool_dir.join("someone-elses-file")).unwrap();
    teardown(&node, &mut c, &id, "pod").await;
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_is_sparse_thick_is_reserved_and_capacity_counts_both() {
    let (node, mut c) = start_on_small_pool().await;
    let empty = available_capacity(&c).await;
    let thin = create_with(
        &mut c,
        "pvc-thin",
        32 * MIB,
        &[("keyMode", "none"), ("provisioning", "thin")],
    )
    .await;
    let thin_file = node.pool_dir.join(format!("{thin}.img"));
    assert!(
        allocated_bytes(&thin_file) < 2 * MIB as u64,
        "a thin volume is sparse"
    );
    let after_thin = available_capacity(&c).await;
    let thick = create_with(&mut c, "pvc-thick", 32 * MIB, NONE).await;
    let after_thick = available_capacity(&c).await;
    // Both are promised in full, whether their blocks are allocated yet or not.
    assert!(empty - after_thin >= 32 * MIB, "{empty} -> {after_thin}");
    assert!(
        after_thin - after_thick >= 32 * MIB,
        "{after_thin} -> {after_thick}"
    );

    // discard would punch the reservation away: refused for thick, fine for thin.
    let with_discard = |id: &str| {
        let mut req = node.stage(id);
        if let Some(csi::volume_capability::AccessType::Mount(m)) = req
            .volume_capability
            .as_mut()
            .and_then(|c| c.access_type.as_mut())
        {
            m.mount_flags = vec!["discard".into()];
        }
        req
    };
    let s = refused(c.node.node_stage_volume(with_discard(&thick)).await);
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("thick"), "{}", s.message());
    c.node
        .node_stage_volume(with_discard(&thin))
        .await
        .expect("discard on a thin volume");
    c.node
        .node_unstage_volume(node.unstage(&thin))
        .await
        .unwrap();

    // An unknown mode names the field and what is accepted.
    let s = refused(
        c.controller
            .create_volume(requests::create(
                "pvc-bad",
                32 * MIB,
                &[("keyMode", "none"), ("provisioning", "lazy")],
            ))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("provisioning"), "{}", s.message());

    // Reserving more than the filesystem has left (someone else filled it) is
    // RESOURCE_EXHAUSTED, and leaves no file behind.
    fill(&node.pool_dir);
    let s = refused(
        c.controller
            .create_volume(requests::create("pvc-late", 32 * MIB, NONE))
            .await,
    );
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    std::fs::remove_file(node.pool_dir.join("someone-elses-file")).unwrap();
    for id in [&thin, &thick] {
        delete(&mut c, id).await.unwrap();
    }
    assert_clean(&node);
}

/// What a thin volume risks, shown: the pool filled from outside while the pod writes. Its
/// writes need blocks the pool no longer has, so they fail under ext4; whatever each writer
/// saw, the volume must then be reported abnormal, with the reason, and still come apart
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_volume_that_runs_out_is_reported_abnormal() {
    let (node, mut c) = start_on_small_pool().await;
    let id = create_with(
        &mut c,
        "pvc-thin-full",
        64 * MIB,
        &[("keyMode", "none"), ("provisioning", "thin")],
    )
    .await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&id, "pod"))
        .await
        .unwrap();
    let target = node.target_path("pod", &id);
    let stats = |c: &mut CsiClient| {
        let mut c = c.clone();
        let (id, target) = (id.clone(), target.clone());
        async move {
            let cond = c
                .node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: id,
                    volume_path: target,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .volume_condition
                .unwrap();
            (cond.abnormal, cond.message)
        }
    };
    let (abnormal, message) = stats(&mut c).await;
    assert!(!abnormal, "{message}");

    fill(&node.pool_dir);

    // The three patterns of the thick test; with thin, each may or may not see an error.
    let mut seen = Vec::new();
    let one = pattern(1, 8 << 20);
    seen.push((
        "one write + fsync",
        std::fs::File::create(format!("{target}/one"))
            .and_then(|mut f| f.write_all(&one).and_then(|_| f.sync_all()))
            .err(),
    ));
    let many = pattern(2, 16 << 20);
    seen.push((
        "many writes + fsync",
        std::fs::File::create(format!("{target}/many"))
            .and_then(|mut f| {
                many.chunks(1 << 20)
                    .try_for_each(|chunk| f.write_all(chunk))
                    .and_then(|_| f.sync_all())
            })
            .err(),
    ));
    let unsynced = pattern(3, 16 << 20);
    seen.push((
        "many writes, no fsync",
        std::fs::File::create(format!("{target}/unsynced"))
            .and_then(|mut f| unsynced.chunks(1 << 20).try_for_each(|c| f.write_all(c)))
            .err(),
    ));
    nix::unistd::sync();
    for (how, error) in &seen {
        println!("thin, pool full: {how}: {error:?}");
    }

    let (abnormal, message) = stats(&mut c).await;
    assert!(
        abnormal,
        "a thin volume that ran out of pool is reported healthy: {message}"
    );
    assert!(
        message.contains("refuses writes") || message.contains("error"),
        "{message}"
    );
    std::fs::remove_file(node.pool_dir.join("someone-elses-file")).unwrap();
    teardown(&node, &mut c, &id, "pod").await;
    assert_clean(&node);
}
