//! Upgrade and restart of a containerized node plugin: the plugin runs in a mount namespace of
//! its own with the pool bind-mounted at another path, as a DaemonSet pod does, so the paths
//! the kernel reports for its loop devices mean nothing to the next plugin. That next plugin,
//! in a new namespace, must still know every volume's loop device (by the backing file's
//! identity), keep enforcing revocation, and tear everything down without a leak.
#![allow(clippy::unwrap_used)]

mod common;
use common::azure::*;
use common::*;

use std::path::Path;

use sealvol_azure_emulator::RoleAssignment;

/// The reported backing paths of the loop devices over `node`'s pool.
fn reported_backing_files(node: &ScratchNode) -> Vec<String> {
    node.loop_devices()
        .iter()
        .map(|dev| {
            let name = dev.trim_start_matches("/dev/");
            std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

/// /metrics of the node plugin that logged its metrics address last.
async fn scrape_metrics(log: &str) -> String {
    let address = log
        .lines()
        .rev()
        .filter(|l| l.contains("metrics listening"))
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok()?["address"]
                .as_str()
                .map(str::to_string)
        })
        .expect("the node logs its metrics address");
    reqwest::get(format!("http://{address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn role_of(mode: &str) -> RoleAssignment {
    match mode {
        "keyvault-secret" => RoleAssignment {
            principal: APP_OID.into(),
            role: "Key Vault Secrets User".into(),
            scope: "/vaults/kv/secrets/kek-secret".into(),
        },
        _ => RoleAssignment {
            principal: APP_OID.into(),
            role: "Key Vault Crypto Service Encryption User".into(),
            scope: "/vaults/kv/keys/kek".into(),
        },
    }
}

fn inline_request(
    node: &ScratchNode,
    azure: &Azure,
    id: &str,
    mode: &str,
) -> csi::NodePublishVolumeRequest {
    let mut req = node.publish(id, "inline-pod");
    req.staging_target_path = String::new();
    req.volume_context
        .insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    req.volume_context.insert("size".into(), "32Mi".into());
    for (k, v) in azure.params(mode) {
        req.volume_context.insert(k, v);
    }
    sealvol::harness::keys::with_pod_token(
        &mut req,
        &azure.token("app"),
        AUD,
        "default",
        "app",
        true,
    );
    req
}

fn assert_no_key(path: &str) {
    let err = std::fs::read(path).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOKEY),
        "reading {path}: {err}"
    );
}

async fn survives_an_upgrade(mode: &str, inline_id: &str) {
    let azure = Azure::start().await;
    let (mut node, mut c) = node_in_container(
        &azure,
        &["--reauthorize-interval=0s", "--metrics-address=127.0.0.1:0"],
    )
    .await;

    // A PVC volume and an inline volume, published and written to.
    let id = create_encrypted(&mut c, &azure, "pvc-upgrade", mode).await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
        .await
        .unwrap();
    let target = node.target_path("pod", &id);
    std::fs::write(format!("{target}/data"), b"persistent").unwrap();
    c.node
        .node_publish_volume(inline_request(&node, &azure, inline_id, mode))
        .await
        .unwrap();
    let inline_target = node.target_path("inline-pod", inline_id);
    std::fs::write(format!("{inline_target}/data"), b"scratch").unwrap();
    nix::unistd::sync();

    // The old container goes away; what it attached is reported by paths of its namespace.
    node.kill();
    drop(c);
    let devices = node.loop_devices();
    assert_eq!(devices.len(), 2, "one loop device per volume: {devices:?}");
    let pool = format!("{}/", node.pool_dir.display());
    for reported in reported_backing_files(&node) {
        assert!(
            !reported.starts_with(&pool),
            "the kernel should report the dead namespace's path, not {reported}"
        );
    }

    // The new container, in a new namespace, finds both volumes in use and keeps them.
    let mut c = node.start(&[]).await.unwrap();
    assert_eq!(
        node.loop_devices(),
        devices,
        "recovery kept the loop devices"
    );
    assert!(is_mounted(&target) && is_mounted(&inline_target));
    assert!(
        !node.log().contains("belonged to no volume"),
        "recovery released a volume in use: {}",
        node.log()
    );
    // The gauges find both volumes' loop devices too.
    let metrics = scrape_metrics(&node.log()).await;
    assert!(
        metrics.contains("sealvol_volumes{state=\"published\"} 2\n"),
        "{metrics}"
    );

    // A due re-authorization still works through the new plugin...
    c.node
        .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
        .await
        .unwrap();
    c.node
        .node_publish_volume(inline_request(&node, &azure, inline_id, mode))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(format!("{target}/data")).unwrap(),
        b"persistent"
    );
    assert_eq!(
        std::fs::read(format!("{inline_target}/data")).unwrap(),
        b"scratch"
    );

    // ... and a revoked role still locks both volumes.
    assert!(azure.emu.revoke_role(&role_of(mode)));
    let s = refused(
        c.node
            .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
            .await,
    );
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    let s = refused(
        c.node
            .node_publish_volume(inline_request(&node, &azure, inline_id, mode))
            .await,
    );
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    assert!(
        !sealvol::harness::keys::key_present(
            Path::new(&node.staging_path(&id)),
            &identifier(&node, &id)
        )
        .unwrap(),
        "the key is still in the kernel"
    );
    assert_no_key(&format!("{target}/data"));
    assert_no_key(&format!("{inline_target}/data"));

    // Teardown through the new plugin leaves nothing.
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    c.node
        .node_unpublish_volume(node.unpublish(inline_id, "inline-pod"))
        .await
        .unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyvault_key_volumes_survive_a_plugin_upgrade() {
    survives_an_upgrade("keyvault-key", &format!("csi-{}", "a1".repeat(32))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyvault_secret_volumes_survive_a_plugin_upgrade() {
    survives_an_upgrade("keyvault-secret", &format!("csi-{}", "b2".repeat(32))).await;
}

/// What a dead container left over volumes that are gone (a file deleted under its mounts, a
/// delete cut short after its rename) is released by the next plugin, found by identity
/// although the kernel reports the old namespace's paths; a volume in use is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_of_a_dead_container_are_released() {
    require_root();
    let mut node = ScratchNode::new(&binary(), None)
        .unwrap()
        .containerized(1 << 30)
        .unwrap();
    let mut c = node.start(&[]).await.unwrap();
    let (gone, _) = ready(&node, &mut c, "pvc-gone", 32 * MIB, "pod-gone").await;
    let (deleting, _) = ready(&node, &mut c, "pvc-deleting", 32 * MIB, "pod-deleting").await;
    let (kept, kept_target) = ready(&node, &mut c, "pvc-kept", 32 * MIB, "pod-kept").await;
    node.kill();
    drop(c);
    std::fs::remove_file(node.pool_dir.join(format!("{gone}.img"))).unwrap();
    std::fs::rename(
        node.pool_dir.join(format!("{deleting}.img")),
        node.pool_dir.join(format!("{deleting}.img.deleting")),
    )
    .unwrap();
    assert_eq!(node.loop_devices().len(), 3);

    let mut c = node.start(&[]).await.unwrap();
    assert_eq!(node.loop_devices().len(), 1, "{}", node.log());
    for id in [&gone, &deleting] {
        assert!(!is_mounted(&node.staging_path(id)), "{}", node.log());
    }
    assert!(is_mounted(&kept_target));
    teardown(&node, &mut c, &kept, "pod-kept").await;
    // The orphans' target directories are kubelet's to remove; no mount is left on them.
    assert_eq!(node.mounts(), Vec::<std::path::PathBuf>::new());
    assert_eq!(node.loop_devices(), Vec::<String>::new());
    assert_eq!(node.pool_files(), Vec::<String>::new());
}
