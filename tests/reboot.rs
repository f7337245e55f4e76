//! A node reboot (the driver killed, every mount and loop device gone, the pool's files kept),
//! in each key mode: kubelet's NodeStageVolume and NodePublishVolume bring the volume back with
//! its data, the key released again to the pod's own identity. With Entra ID or Key Vault
//! down across the reboot, the publish is UNAVAILABLE and mounts nothing, and the data is
//! there once they are back.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use common::azure::*;
use sealvol_azure_emulator::{FaultKind, FaultSpec};

fn down(route: &str) -> FaultSpec {
    FaultSpec {
        route: route.into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: None,
        duration_ms: None,
        client_id: None,
    }
}

async fn stage_and_publish(
    node: &ScratchNode,
    c: &mut CsiClient,
    azure: &Azure,
    id: &str,
    mode: &str,
) -> Result<(), tonic::Status> {
    c.node.node_stage_volume(node.stage(id)).await?;
    let req = if mode == "none" {
        node.publish(id, "pod")
    } else {
        publish_as(node, id, "pod", &azure.token("app"), "app")
    };
    c.node.node_publish_volume(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_come_back_after_a_reboot_in_every_key_mode() {
    let azure = Azure::start().await;
    let (mut node, mut c) = node_for(&azure).await;
    for mode in ["none", "keyvault-key", "keyvault-secret"] {
        let id = if mode == "none" {
            create_with(&mut c, &format!("pvc-reboot-{mode}"), 32 * MIB, NONE).await
        } else {
            create_encrypted(&mut c, &azure, &format!("pvc-reboot-{mode}"), mode).await
        };
        stage_and_publish(&node, &mut c, &azure, &id, mode)
            .await
            .unwrap();
        let target = node.target_path("pod", &id);
        std::fs::write(format!("{target}/f"), mode).unwrap();
        nix::unistd::sync();

        node.reboot();
        assert!(!is_mounted(&target), "{mode}: the reboot took the mounts");
        assert!(
            node.loop_devices().is_empty(),
            "{mode}: and the loop devices"
        );
        c = node.start(&[]).await.unwrap();
        stage_and_publish(&node, &mut c, &azure, &id, mode)
            .await
            .unwrap_or_else(|s| panic!("{mode}: {s:?}"));
        assert_eq!(
            std::fs::read_to_string(format!("{target}/f")).unwrap(),
            mode,
            "{mode}"
        );
        teardown(&node, &mut c, &id, "pod").await;
    }
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_or_key_vault_down_across_a_reboot_fails_closed_then_recovers() {
    let azure = Azure::start().await;
    let (mut node, mut c) = node_for(&azure).await;
    for (mode, route) in [
        ("keyvault-key", "entra.*"),
        ("keyvault-key", "keyvault.*"),
        ("keyvault-secret", "keyvault.*"),
    ] {
        let id = create_encrypted(&mut c, &azure, &format!("pvc-down-{mode}"), mode).await;
        stage_and_publish(&node, &mut c, &azure, &id, mode)
            .await
            .unwrap();
        let target = node.target_path("pod", &id);
        std::fs::write(format!("{target}/f"), route).unwrap();
        nix::unistd::sync();

        node.reboot();
        azure.emu.inject_fault(down(route));
        c = node.start(&[]).await.unwrap();
        let s = stage_and_publish(&node, &mut c, &azure, &id, mode)
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{mode}, {route} down: {s:?}");
        assert!(
            !is_mounted(&target),
            "{mode}, {route} down: nothing published"
        );

        azure.emu.clear_faults();
        let req = publish_as(&node, &id, "pod", &azure.token("app"), "app");
        c.node
            .node_publish_volume(req)
            .await
            .unwrap_or_else(|s| panic!("{mode}, {route} back: {s:?}"));
        assert_eq!(
            std::fs::read_to_string(format!("{target}/f")).unwrap(),
            route,
            "{mode}"
        );
        teardown(&node, &mut c, &id, "pod").await;
    }
    assert_clean(&node);
}
