//! An inline volume whose first publish is refused is kept, staged and keyless, for kubelet's
//! retries (which never unpublish it): not created, formatted and wiped again on each retry,
//! published by the first retry that is authorized, and removed by a timer after
//! `--refused-inline-ttl` when none is.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use common::azure::*;
use sealvol::harness::keys::with_pod_token;
use sealvol_azure_emulator::RoleAssignment;

const INTRUDER_OID: &str = "9f0c2d4e-2222-4222-8222-0000000000bb";

fn inline_request(
    node: &ScratchNode,
    azure: &Azure,
    id: &str,
    pod: &str,
) -> csi::NodePublishVolumeRequest {
    let mut req = node.publish(id, pod);
    req.staging_target_path = String::new();
    for (k, v) in azure.params("keyvault-key") {
        req.volume_context.insert(k, v);
    }
    for (k, v) in [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("size", "32Mi"),
        ("clientID", INTRUDER),
    ] {
        req.volume_context.insert(k.into(), v.into());
    }
    with_pod_token(
        &mut req,
        &azure.token("intruder"),
        AUD,
        "default",
        "intruder",
        true,
    );
    req
}

fn created_count(node: &ScratchNode, id: &str) -> usize {
    node.log()
        .lines()
        .filter(|l| l.contains("inline volume created") && l.contains(id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_inline_volume_is_kept_for_retries_then_removed() {
    let azure = Azure::start().await;
    let (node, mut c) = node_with(&azure, &["--refused-inline-ttl=3s"]).await;
    let id = format!("csi-{}", "e".repeat(64));
    let req = inline_request(&node, &azure, &id, "pod-refused");
    for _ in 0..3 {
        let s = refused(c.node.node_publish_volume(req.clone()).await);
        assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    }
    assert_eq!(created_count(&node, &id), 1, "{}", node.log());
    assert_eq!(node.pool_files(), vec![format!("{id}.img")]);
    assert!(!is_mounted(&node.target_path("pod-refused", &id)));
    let kms = &header(&node, &id)["kms"];
    assert!(kms["wrapped"].is_null(), "no key was ever made: {kms}");
    assert!(header(&node, &id)["refused_since_ms"].as_u64().is_some());
    // Counted in the pool: the file holds its place.
    let while_kept = available_capacity(&c).await;

    // kubelet gives up when the pod is deleted, without an unpublish: the timer removes it.
    let mut gone = false;
    for _ in 0..100 {
        if node.pool_files().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(gone, "{}", node.log());
    assert!(available_capacity(&c).await > while_kept);
    assert!(
        node.log()
            .contains("removed an inline volume whose first publish failed")
    );
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_inline_volume_is_published_once_its_identity_is_authorized() {
    let azure = Azure::start().await;
    let (node, mut c) = node_with(&azure, &["--refused-inline-ttl=10m"]).await;
    let id = format!("csi-{}", "f".repeat(64));
    let req = inline_request(&node, &azure, &id, "pod-later");
    assert_eq!(
        code(c.node.node_publish_volume(req.clone()).await),
        Code::PermissionDenied
    );
    let role = RoleAssignment {
        principal: INTRUDER_OID.into(),
        role: "Key Vault Crypto Service Encryption User".into(),
        scope: "/vaults/kv/keys/kek".into(),
    };
    azure.emu.assign_role(role);
    c.node
        .node_publish_volume(req.clone())
        .await
        .expect("kubelet's retry after the role is granted");
    assert_eq!(created_count(&node, &id), 1, "{}", node.log());
    assert!(header(&node, &id)["refused_since_ms"].is_null());
    let target = node.target_path("pod-later", &id);
    std::fs::write(format!("{target}/f"), b"ok").unwrap();
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod-later"))
        .await
        .unwrap();
    assert_clean(&node);
}
