//! CSI inline ephemeral volumes: created by their publish, destroyed by their unpublish.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

fn inline_publish(
    node: &ScratchNode,
    pod: &str,
    attrs: &[(&str, &str)],
) -> (String, csi::NodePublishVolumeRequest) {
    // kubelet's id for an inline volume: "csi-" and a sha256 in hex.
    let id = format!(
        "csi-{:064x}",
        pod.len() as u64 * 7919 + pod.bytes().map(u64::from).sum::<u64>()
    );
    let mut req = node.publish(&id, pod);
    req.staging_target_path = String::new();
    req.volume_context = [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", pod),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.uid", "uid-1"),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ]
    .iter()
    .chain(attrs.iter())
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    (id, req)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_volume_lives_and_dies_with_its_publication() {
    let (node, mut c) = start().await;
    let (id, req) = inline_publish(
        &node,
        "inline-pod",
        &[("keyMode", "none"), ("size", "64Mi")],
    );
    c.node
        .node_publish_volume(req.clone())
        .await
        .expect("inline publish");
    c.node
        .node_publish_volume(req.clone())
        .await
        .expect("inline publish again");
    assert_eq!(node.pool_files(), vec![format!("{id}.img")]);
    let target = node.target_path("inline-pod", &id);
    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let total = stats.usage[0].total;
    assert!(
        total > 50 * MIB && total <= 64 * MIB,
        "size attribute honoured: {total}"
    );
    std::fs::write(format!("{target}/scratch"), b"x").unwrap();
    // It is not a persistent volume: no staging.
    assert_eq!(
        code(c.node.node_stage_volume(node.stage(&id)).await),
        Code::FailedPrecondition
    );

    c.node
        .node_unpublish_volume(node.unpublish(&id, "inline-pod"))
        .await
        .expect("unpublish");
    assert_clean(&node);
    assert_eq!(
        std::fs::read_dir(node.state_dir.join("inline"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    c.node
        .node_unpublish_volume(node.unpublish(&id, "inline-pod"))
        .await
        .expect("unpublish again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inline_attributes_and_refusals_leave_nothing() {
    let (node, mut c) = start().await;
    for attrs in [
        vec![("keyMode", "none"), ("size", "lots")],
        vec![("keyMode", "none"), ("colour", "red")],
        vec![("size", "64Mi")],
    ] {
        let (_, req) = inline_publish(&node, "bad-pod", &attrs);
        let s = refused(c.node.node_publish_volume(req).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{attrs:?}");
        assert!(
            s.message().starts_with("volume_context") || s.message().starts_with("keyVaultURL"),
            "{}",
            s.message()
        );
    }
    assert_clean(&node);

    // A target that already holds another mount: refused, and the new volume rolled back.
    let (id, req) = inline_publish(&node, "busy-pod", &[("keyMode", "none"), ("size", "32Mi")]);
    let target = node.target_path("busy-pod", &id);
    std::fs::create_dir_all(&target).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        target.as_str(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let s = refused(c.node.node_publish_volume(req).await);
    assert_eq!(s.code(), Code::AlreadyExists, "{}", s.message());
    nix::mount::umount2(target.as_str(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_clean(&node);
}
