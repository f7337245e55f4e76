//! KEK rotation: when a volume's KEK is not pinned and Key Vault has a newer enabled version
//! (a key rotated, a secret given a new version), a due re-authorization re-wraps the DEK under
//! it with the pod's identity, in one atomic header write; the old version can then be
//! disabled and the volume still opens. `sealvol_volumes_by_kek_version` says which versions
//! live volumes use. A newer version that is disabled is not moved to; a pinned one never is.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use common::azure::*;

/// The `sealvol_volumes_by_kek_version` series: version -> volumes.
async fn by_version(base: &str) -> std::collections::BTreeMap<String, u64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("sealvol_volumes_by_kek_version{"))
        .filter_map(|l| {
            let version = l.split("version=\"").nth(1)?.split('"').next()?.to_string();
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((version, n))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn kek_version(node: &ScratchNode, id: &str) -> String {
    header(node, id)["kms"]["wrapped"]["kek_version"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Publishes (again) as the app at pod `pod` and checks the file written at the start.
async fn publish_and_read(
    node: &ScratchNode,
    c: &mut CsiClient,
    azure: &Azure,
    id: &str,
    pod: &str,
) {
    c.node
        .node_publish_volume(publish_as(node, id, pod, &azure.token("app"), "app"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(format!("{}/f", node.target_path(pod, id))).unwrap(),
        b"before rotation"
    );
}

/// Stages and publishes as the app at pod "a", and writes the file the checks read back.
async fn stage_publish_and_write(node: &ScratchNode, c: &mut CsiClient, azure: &Azure, id: &str) {
    c.node.node_stage_volume(node.stage(id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(node, id, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    std::fs::write(
        format!("{}/f", node.target_path("a", id)),
        b"before rotation",
    )
    .unwrap();
}

/// Unpublishes, unstages and stages again, so the next publish must unwrap from the header.
async fn cycle(node: &ScratchNode, c: &mut CsiClient, id: &str, pod: &str) {
    c.node
        .node_unpublish_volume(node.unpublish(id, pod))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(id)).await.unwrap();
    c.node.node_stage_volume(node.stage(id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_kek_is_adopted_on_reauthorization_and_the_old_version_can_go() {
    let azure = Azure::start().await;
    let (node, mut c) = node_with(
        &azure,
        &["--reauthorize-interval=0s", "--metrics-address=127.0.0.1:0"],
    )
    .await;
    let base = format!("http://{}", metrics_address(&node.log()));
    let id = create_encrypted(&mut c, &azure, "pvc-rotate", "keyvault-key").await;
    stage_publish_and_write(&node, &mut c, &azure, &id).await;
    let v1 = kek_version(&node, &id);
    assert_eq!(by_version(&base).await, [(v1.clone(), 1)].into());

    // Rotation: the next due re-authorization moves the volume to v2.
    let v2 = azure.emu.rotate_key("kv", "kek").unwrap();
    publish_and_read(&node, &mut c, &azure, &id, "a").await;
    assert_eq!(kek_version(&node, &id), v2);
    assert!(
        node.log()
            .contains("DEK re-wrapped under the KEK's current version")
    );
    assert_eq!(by_version(&base).await, [(v2.clone(), 1)].into());

    // v1 can be disabled: the volume opens from its header under v2.
    assert!(azure.emu.set_key_version_enabled("kv", "kek", &v1, false));
    cycle(&node, &mut c, &id, "a").await;
    publish_and_read(&node, &mut c, &azure, &id, "a").await;

    // A newer version that is disabled is not moved to.
    let v3 = azure.emu.rotate_key("kv", "kek").unwrap();
    assert!(azure.emu.set_key_version_enabled("kv", "kek", &v3, false));
    publish_and_read(&node, &mut c, &azure, &id, "a").await;
    assert_eq!(kek_version(&node, &id), v2);

    cycle(&node, &mut c, &id, "a").await;
    publish_and_read(&node, &mut c, &azure, &id, "a").await;
    teardown(&node, &mut c, &id, "a").await;
    assert_eq!(by_version(&base).await, Default::default());
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_secret_version_is_adopted_and_a_pinned_key_stays() {
    let azure = Azure::start().await;
    let (node, mut c) = node_with(&azure, &["--reauthorize-interval=0s"]).await;

    // keyvault-secret: a new secret version is the rotation.
    let id = create_encrypted(&mut c, &azure, "pvc-secret-rotate", "keyvault-secret").await;
    stage_publish_and_write(&node, &mut c, &azure, &id).await;
    let old = kek_version(&node, &id);
    let new = azure
        .emu
        .set_secret(
            "kv",
            "kek-secret",
            "3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .unwrap();
    assert_ne!(old, new);
    publish_and_read(&node, &mut c, &azure, &id, "a").await;
    assert_eq!(kek_version(&node, &id), new);
    cycle(&node, &mut c, &id, "a").await;
    publish_and_read(&node, &mut c, &azure, &id, "a").await;
    teardown(&node, &mut c, &id, "a").await;

    // A pinned key version is kept through a rotation.
    let pinned = kek_version_of_latest(&azure);
    let mut params = azure.params("keyvault-key");
    params.push(("keyVersion".into(), pinned.clone()));
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let id = create_with(&mut c, "pvc-pinned", 32 * MIB, &refs).await;
    stage_publish_and_write(&node, &mut c, &azure, &id).await;
    azure.emu.rotate_key("kv", "kek").unwrap();
    publish_and_read(&node, &mut c, &azure, &id, "a").await;
    assert_eq!(kek_version(&node, &id), pinned);
    teardown(&node, &mut c, &id, "a").await;
    assert_clean(&node);
}

/// The newest version of the test vault's key, rotated to so that it is known.
fn kek_version_of_latest(azure: &Azure) -> String {
    azure.emu.rotate_key("kv", "kek").unwrap()
}
