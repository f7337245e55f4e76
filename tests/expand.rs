//! Expansion: the file, the loop device and ext4 grow and the data survives. Online (while
//! published) where the driver holds CAP_SYS_RESOURCE; otherwise offline, while the volume is
//! staged without pods, and a published volume is refused with the reason.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_keeps_data() {
    let (node, mut c) = start().await;
    let (id, target) = ready(&node, &mut c, "pvc-grow", 64 * MIB, "pod").await;
    let payload = pattern(8 << 20);
    std::fs::write(format!("{target}/payload"), &payload).unwrap();
    let staging = node.staging_path(&id);
    let total = |c: &mut CsiClient, path: String| {
        let mut c = c.clone();
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: path,
            staging_target_path: String::new(),
        };
        async move {
            c.node
                .node_get_volume_stats(req)
                .await
                .unwrap()
                .into_inner()
                .usage[0]
                .total
        }
    };
    let before = total(&mut c, staging.clone()).await;

    let expand = |bytes: i64| csi::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let r = c
        .controller
        .controller_expand_volume(expand(256 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 256 * MIB);
    assert!(r.node_expansion_required);
    // Repeating it is fine; a smaller request keeps the larger capacity.
    assert_eq!(
        c.controller
            .controller_expand_volume(expand(256 * MIB))
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes,
        256 * MIB
    );
    assert_eq!(
        c.controller
            .controller_expand_volume(expand(128 * MIB))
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes,
        256 * MIB
    );

    let node_expand = |path: String| csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: path,
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 256 * MIB,
            limit_bytes: 0,
        }),
        staging_target_path: staging.clone(),
        ..Default::default()
    };
    if can_resize_online() {
        let r = c
            .node
            .node_expand_volume(node_expand(target.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 256 * MIB);
        c.node
            .node_expand_volume(node_expand(target.clone()))
            .await
            .expect("node expansion again");
    } else {
        let s = refused(c.node.node_expand_volume(node_expand(target.clone())).await);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(
            s.message().contains("CAP_SYS_RESOURCE") && s.message().contains("published"),
            "{}",
            s.message()
        );
        // What kubelet does for an OFFLINE plugin: expand while staged without pods.
        c.node
            .node_unpublish_volume(node.unpublish(&id, "pod"))
            .await
            .unwrap();
        let r = c
            .node
            .node_expand_volume(node_expand(staging.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 256 * MIB);
        c.node
            .node_expand_volume(node_expand(staging.clone()))
            .await
            .expect("node expansion again");
        c.node
            .node_publish_volume(node.publish(&id, "pod"))
            .await
            .unwrap();
    }
    let after = total(&mut c, target.clone()).await;
    assert!(after > before * 3, "ext4 grew: {before} -> {after}");
    assert_eq!(
        std::fs::read(format!("{target}/payload")).unwrap(),
        payload,
        "data survived"
    );

    // Without a new size; beyond the pool.
    assert_eq!(
        code(c.controller.controller_expand_volume(expand(0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.controller.controller_expand_volume(expand(1 << 60)).await),
        Code::ResourceExhausted
    );
    let listed = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().capacity_bytes,
        256 * MIB
    );

    teardown(&node, &mut c, &id, "pod").await;
    assert_clean(&node);
}
