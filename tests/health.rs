//! Honest volume health: NodeGetVolumeStats reports a volume abnormal, saying why, when its
//! filesystem recorded errors, when its backing file was truncated or removed under it, and
//! `sealvol_volumes_abnormal` counts such volumes, and a Warning event on the volume's claim
//! says it once. A volume whose backing file was removed can
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
    let (api, events) = event_sink().await;
    // Removed on drop, also when the test fails.
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "driver-sa-token").unwrap();
    let flags = [
        "--metrics-address=127.0.0.1:0".to_string(),
        format!("--kube-api-url={api}"),
        format!("--kube-token-file={}", token.path().display()),
    ];
    let (node, mut c) =
        start_with(&flags.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await;
    // The damaged volume's claim, as external-provisioner's --extra-create-metadata names it.
    let errors = create_with(
        &mut c,
        "pvc-errors",
        32 * MIB,
        &[
            ("keyMode", "none"),
            ("csi.storage.k8s.io/pvc/namespace", "default"),
            ("csi.storage.k8s.io/pvc/name", "claim-e"),
        ],
    )
    .await;
    c.node.node_stage_volume(node.stage(&errors)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&errors, "pod-e"))
        .await
        .unwrap();
    let errors_target = node.target_path("pod-e", &errors);
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
    // One Warning event on the claim when the damage is found, not one per stats call.
    condition(&mut c, &errors, &errors_target).await;
    let mut posted = Vec::new();
    for _ in 0..50 {
        posted = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "VolumeAbnormal")
            .cloned()
            .collect::<Vec<_>>();
        if !posted.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let all: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "VolumeAbnormal")
        .cloned()
        .collect();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(posted[0]["involvedObject"]["name"], "claim-e");
    assert_eq!(posted[0]["involvedObject"]["kind"], "PersistentVolumeClaim");
    assert_eq!(posted[0]["type"], "Warning");
    assert!(posted[0]["message"].as_str().unwrap().contains("error"));

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
