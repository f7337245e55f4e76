//! Honest volume health: NodeGetVolumeStats reports a volume abnormal, saying why, when its
//! filesystem recorded errors, when its backing file was truncated or removed under it, and
//! `sealvol_volumes_abnormal` counts such volumes. A volume whose backing file was removed can
//! still be unpublished and unstaged, so its pod does not hang in Terminating.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

async fn abnormal_gauge(node: &ScratchNode) -> String {
    let text = reqwest::get(format!("http://{}/metrics", metrics_address(&node.log())))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("sealvol_volumes_abnormal "))
        .map(|l| l.rsplit(' ').next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no sealvol_volumes_abnormal in:\n{text}"))
}

async fn condition(c: &mut CsiClient, id: &str, path: &str) -> (bool, String) {
    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    (cond.abnormal, cond.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_volumes_are_reported_abnormal() {
    let (node, mut c) = start_with(&["--metrics-address=127.0.0.1:0"], &[]).await;
    let (errors, errors_target) = ready(&node, &mut c, "pvc-errors", 32 * MIB, "pod-e").await;
    let (cut, cut_target) = ready(&node, &mut c, "pvc-cut", 32 * MIB, "pod-c").await;
    let (gone, gone_target) = ready(&node, &mut c, "pvc-gone", 32 * MIB, "pod-g").await;
    for (id, target) in [
        (&errors, &errors_target),
        (&cut, &cut_target),
        (&gone, &gone_target),
    ] {
        let (abnormal, message) = condition(&mut c, id, target).await;
        assert!(!abnormal, "{message}");
    }
    assert_eq!(abnormal_gauge(&node).await, "0");

    // ext4 records an error (as it does when a write fails underneath it).
    let file = node.pool_dir.join(format!("{errors}.img"));
    let listed = run("losetup", &["-j", &file.display().to_string()]);
    let device = listed.split(':').next().unwrap().trim().to_string();
    std::fs::write(
        format!(
            "/sys/fs/ext4/{}/trigger_fs_error",
            device.trim_start_matches("/dev/")
        ),
        "sealvol test",
    )
    .unwrap();
    let (abnormal, message) = condition(&mut c, &errors, &errors_target).await;
    assert!(abnormal && message.contains("error"), "{message}");

    // The backing file truncated under the mounted volume.
    let file = node.pool_dir.join(format!("{cut}.img"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(2 * MIB as u64)
        .unwrap();
    let (abnormal, message) = condition(&mut c, &cut, &cut_target).await;
    assert!(abnormal && message.contains("truncated"), "{message}");

    // The backing file removed from the pool.
    std::fs::remove_file(node.pool_dir.join(format!("{gone}.img"))).unwrap();
    let (abnormal, message) = condition(&mut c, &gone, &gone_target).await;
    assert!(abnormal && message.contains("removed"), "{message}");
    assert_eq!(abnormal_gauge(&node).await, "3");

    // kubelet can still take the removed one down: unpublish, unstage, and delete is done.
    c.node
        .node_unpublish_volume(node.unpublish(&gone, "pod-g"))
        .await
        .expect("unpublish of a volume whose file was removed");
    c.node
        .node_unstage_volume(node.unstage(&gone))
        .await
        .expect("unstage of a volume whose file was removed");
    delete(&mut c, &gone).await.unwrap();
    for (id, pod) in [(&errors, "pod-e"), (&cut, "pod-c")] {
        c.node
            .node_unpublish_volume(node.unpublish(id, pod))
            .await
            .unwrap();
        c.node.node_unstage_volume(node.unstage(id)).await.unwrap();
        delete(&mut c, id).await.unwrap();
    }
    for _ in 0..100 {
        if node.loop_devices().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_clean(&node);
}

/// The pool's filesystem unmounted (lazily: the loop device keeps it alive) under a published
/// volume: reported, counted, and kubelet can still take the volume down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_pool_is_reported_and_its_volumes_can_be_taken_down() {
    require_root();
    let mut node = ScratchNode::new(&binary(), None)
        .unwrap()
        .pool_on_tmpfs(128 << 20)
        .unwrap()
        .with_args(&["--metrics-address=127.0.0.1:0"]);
    let mut c = node.start(&[]).await.unwrap();
    let (id, target) = ready(&node, &mut c, "pvc-away", 32 * MIB, "pod").await;
    std::fs::write(format!("{target}/f"), b"still writable").unwrap();
    nix::mount::umount2(&node.pool_dir, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let (abnormal, message) = condition(&mut c, &id, &target).await;
    assert!(abnormal && message.contains("unreachable"), "{message}");
    assert_eq!(abnormal_gauge(&node).await, "1");
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .expect("unpublish with the pool gone");
    c.node
        .node_unstage_volume(node.unstage(&id))
        .await
        .expect("unstage with the pool gone");
    delete(&mut c, &id).await.unwrap();
    for _ in 0..100 {
        if node.loop_devices().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_clean(&node);
}
