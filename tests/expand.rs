//! Expansion is node-only: no node's controller service advertises EXPAND_VOLUME (so
//! csi-resizer uses its trivial resizer), and kubelet's NodeExpandVolume on the node that holds
//! the volume grows the file, the loop device and ext4, and the data survives. Online (while
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

fn advertises_controller_expansion(caps: &csi::ControllerGetCapabilitiesResponse) -> bool {
    use csi::controller_service_capability::{Type, rpc::Type as C};
    caps.capabilities
        .iter()
        .any(|c| matches!(&c.r#type, Some(Type::Rpc(r)) if r.r#type == C::ExpandVolume as i32))
}

async fn start_node(id: &str) -> (ScratchNode, CsiClient) {
    require_root();
    let mut node = ScratchNode::new(&binary(), None).unwrap();
    node.node_id = id.into();
    let c = node.start(&[]).await.unwrap();
    (node, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_is_node_only_and_keeps_data() {
    // Two nodes, each with its own pool; the volume lives on node a.
    let (node, mut c) = start_node("node-a").await;
    let (other, mut other_c) = start_node("node-b").await;
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

    // No controller expansion on any node: csi-resizer's trivial resizer only updates the PV,
    // and nothing reaches a node that does not hold the volume.
    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 256 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    for c in [&mut c, &mut other_c] {
        let caps = c
            .controller
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!advertises_controller_expansion(&caps));
        assert_eq!(
            code(c.controller.controller_expand_volume(expand.clone()).await),
            Code::Unimplemented
        );
    }

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

    // A smaller or no size keeps the capacity; beyond the pool is RESOURCE_EXHAUSTED.
    let sized = |bytes: i64| csi::NodeExpandVolumeRequest {
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..node_expand(staging.clone())
    };
    let offline = !can_resize_online();
    if offline {
        c.node
            .node_unpublish_volume(node.unpublish(&id, "pod"))
            .await
            .unwrap();
    }
    for bytes in [128 * MIB, 0] {
        let r = c.node.node_expand_volume(sized(bytes)).await.unwrap();
        assert_eq!(r.into_inner().capacity_bytes, 256 * MIB);
    }
    let s = refused(c.node.node_expand_volume(sized(1 << 60)).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    if offline {
        c.node
            .node_publish_volume(node.publish(&id, "pod"))
            .await
            .unwrap();
    }
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
    // The other node never heard of the volume: since it started serving, no error or warning.
    let log = other.log();
    let serving = log
        .split_once("serving CSI")
        .map(|(_, after)| after)
        .unwrap();
    assert!(
        !serving.contains("ERROR") && !serving.contains("WARN"),
        "{log}"
    );
    assert_clean(&other);
}
