//! A node that cannot reach Entra ID or Key Vault says why: the status kubelet turns into the
//! pod's FailedMount event (and the VolumeLocked event's reason) carries the root cause of a TLS
//! or connection failure, not only the SDK's "retry policy expired".
#![allow(clippy::unwrap_used)]

mod common;
use common::azure::*;
use common::*;

async fn node_without(azure: &Azure, authority: &str, trust: bool) -> (ScratchNode, CsiClient) {
    require_root();
    // Without --ca-file the emulator's certificate is signed by nobody this node trusts.
    let mut node = ScratchNode::new(&binary(), None).unwrap();
    if trust {
        let ca = node.root.join("emulator-ca.pem");
        std::fs::write(&ca, &azure.emu.ca_cert_pem).unwrap();
        node = node.with_args(&[&format!("--ca-file={}", ca.display())]);
    }
    let mut node = node.with_args(&[
        &format!("--authority-host={authority}"),
        &format!("--tenant-id={TENANT}"),
        "--keyvault-verify-challenge=false",
        &format!("--allowed-vault-hosts={}", azure.vault_hosts()),
    ]);
    let c = node.start(&[]).await.unwrap();
    (node, c)
}

async fn first_publish(azure: &Azure, authority: &str, trust: bool) -> tonic::Status {
    let (node, mut c) = node_without(azure, authority, trust).await;
    let id = create_encrypted(&mut c, azure, "pvc-tls", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    let s = refused(
        c.node
            .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
            .await,
    );
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_named() {
    let azure = Azure::start().await;
    let s = first_publish(&azure, &azure.emu.base_url, false).await;
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(
        s.message().contains("UnknownIssuer") || s.message().contains("certificate"),
        "{}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_named() {
    let azure = Azure::start().await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    // The vault is trusted, so the Entra exchange is what fails.
    let s = first_publish(&azure, &format!("https://127.0.0.1:{port}"), true).await;
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(
        s.message().to_lowercase().contains("connection refused"),
        "{}",
        s.message()
    );
}
