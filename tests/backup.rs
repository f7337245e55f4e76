//! Snapshot backups to Azure Blob storage (Azurite over HTTPS, behind the emulator's RBAC
//! gateway), written with the driver's own workload identity: a backup holds no plaintext and
//! no unwrapped key; it restores on another node (another pool and state directory) for an
//! authorized identity and for no other; a driver killed during the upload resumes it and never
//! reports a half backup ready; delete removes the blobs; an identity without a Blob role, a
//! container the node does not allow, a `keyMode: none` volume and a failing Blob service are
//! refused with errors that say so.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientMethodOptions, ClientOptions, Transport, Url};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use common::azure::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn params(azure: &Azure) -> Vec<(String, String)> {
    azure.params("keyvault-key")
}

fn refs(p: &[(String, String)]) -> Vec<(&str, &str)> {
    p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn backup_request(name: &str, source: &str, url: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        parameters: [("backupURL".to_string(), url.to_string())].into(),
        ..Default::default()
    }
}

/// CreateSnapshot once; ABORTED (the snapshot is busy for a moment, e.g. while its upload
/// records itself complete) is asked again, as csi-snapshotter does.
async fn create_snapshot(
    c: &mut CsiClient,
    req: &csi::CreateSnapshotRequest,
) -> Result<csi::Snapshot, tonic::Status> {
    loop {
        match c.controller.create_snapshot(req.clone()).await {
            Ok(r) => return Ok(r.into_inner().snapshot.unwrap()),
            Err(s) if s.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// CreateSnapshot repeated, as csi-snapshotter does, until the snapshot is ready.
async fn until_ready(c: &mut CsiClient, req: csi::CreateSnapshotRequest) -> csi::Snapshot {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let snap = create_snapshot(c, &req).await.unwrap();
        if snap.ready_to_use {
            return snap;
        }
        assert!(Instant::now() < deadline, "the backup never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn restore_request(name: &str, snapshot: &str, p: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut req = requests::create(name, 64 * MIB, p);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        )),
    });
    req
}

/// An encrypted volume published to `app` holding `files` (name, bytes), synced.
async fn volume_with(
    azure: &Azure,
    node: &ScratchNode,
    c: &mut CsiClient,
    name: &str,
    files: &[(&str, Vec<u8>)],
) -> String {
    let p = params(azure);
    let id = create_with(c, name, 64 * MIB, &refs(&p)).await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(node, &id, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    let target = node.target_path("a", &id);
    for (file, data) in files {
        let mut f = std::fs::File::create(format!("{target}/{file}")).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    id
}

/// A client of the backup container acting as `client_id`, with the ServiceAccount token
/// `token` as its assertion.
fn container_as(azure: &Azure, client_id: &str, token: String) -> BlobContainerClient {
    /// A pod token; its Debug does not print it.
    struct Token(String);
    impl std::fmt::Debug for Token {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Token(..)")
        }
    }
    #[async_trait::async_trait]
    impl ClientAssertion for Token {
        async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
            Ok(self.0.clone())
        }
    }
    let http = reqwest::Client::builder()
        .tls_certs_merge([
            reqwest::Certificate::from_pem(azure.emu.ca_cert_pem.as_bytes()).unwrap(),
        ])
        .no_gzip()
        .build()
        .unwrap();
    let mut options = ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        ..ClientOptions::default()
    };
    let mut cloud = azure_core::cloud::CustomConfiguration::default();
    cloud.authority_host = azure.emu.base_url.clone();
    let mut credential_options = options.clone();
    credential_options.cloud = Some(Arc::new(azure_core::cloud::CloudConfiguration::from(cloud)));
    let credential: Arc<dyn TokenCredential> = ClientAssertionCredential::new(
        TENANT.into(),
        client_id.into(),
        Token(token),
        Some(ClientAssertionCredentialOptions {
            client_options: credential_options,
        }),
    )
    .unwrap();
    options.retry = azure_core::http::RetryOptions::none();
    BlobContainerClient::new(
        Url::parse(&azure.container_url()).unwrap(),
        Some(credential),
        Some(BlobContainerClientOptions {
            client_options: options,
            ..Default::default()
        }),
    )
    .unwrap()
}

/// The blob `name`'s bytes, or None when there is no such blob.
async fn blob(container: &BlobContainerClient, name: &str) -> Option<Vec<u8>> {
    match container.blob_client(name).download(None).await {
        Ok(r) => Some(r.body.collect().await.unwrap().to_vec()),
        Err(e) if e.http_status().map(u16::from) == Some(404) => None,
        Err(e) => panic!("reading {name}: {e}"),
    }
}

/// The forms a key could take in a file: raw, hex, and base64 (standard and URL-safe) at each
/// of the three alignments; 16 bytes of the key are enough to find it.
fn key_forms(key: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut forms = vec![key[..16].to_vec()];
    forms.push(
        key[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
    );
    for skip in 0..3 {
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            // Characters past the first few depend only on the bytes from `skip` on.
            let text = engine.encode(&key[skip..skip + 24]);
            forms.push(text.as_bytes()[4..28].to_vec());
        }
    }
    forms
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// The DEK of volume `id`, from its header, as only the KEK's holder could unwrap it.
fn dek_of(azure: &Azure, node: &ScratchNode, id: &str) -> Vec<u8> {
    use base64::Engine;
    let wrapped = &header(node, id)["kms"]["wrapped"];
    let ciphertext = base64::engine::general_purpose::STANDARD
        .decode(wrapped["ciphertext"].as_str().unwrap())
        .unwrap();
    azure
        .emu
        .unwrap_as_vault(
            "kv",
            "kek",
            wrapped["kek_version"].as_str().unwrap(),
            &ciphertext,
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_holds_only_ciphertext_and_restores_on_another_node_for_its_identity_only() {
    let azure = Azure::start_with_blob().await;
    let (node, mut c) = node_with_backup(&azure, &[], &[]).await;
    let files = [
        ("secret-name-one", pattern(7, 9 << 20)),
        ("secret-name-two", pattern(8, 3 << 20)),
    ];
    let src = volume_with(&azure, &node, &mut c, "pvc-src", &files).await;
    let dek = dek_of(&azure, &node, &src);
    let key_calls = azure.wraps() + azure.unwraps();

    let snap = until_ready(
        &mut c,
        backup_request("snap-backup", &src, &azure.container_url()),
    )
    .await;
    let id = snap.snapshot_id.clone();
    assert_eq!(snap.source_volume_id, src);
    // The backup took no Key Vault call: the driver's identity has no role there.
    assert_eq!(azure.wraps() + azure.unwraps(), key_calls);
    assert!(
        azure.emu.count("blob.put_block", None) > 0,
        "nothing went through the gateway"
    );

    // What the container holds: ciphertext, the wrapped DEK, and a manifest.
    let reader = container_as(&azure, READER, azure.token("reader"));
    let data = blob(&reader, &format!("{id}/data")).await.unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(&reader, &format!("{id}/manifest.json")).await.unwrap())
            .unwrap();
    assert_eq!(manifest["snapshot_id"], id.as_str());
    assert!(data.len() > 12 << 20, "{} bytes uploaded", data.len());
    assert!(
        data.len() < 40 << 20,
        "{} bytes uploaded: holes were sent",
        data.len()
    );
    for (name, bytes) in &files {
        for chunk in [&bytes[..4096], &bytes[bytes.len() - 4096..]] {
            assert!(!contains(&data, chunk), "plaintext of {name} in the backup");
        }
        assert!(
            !contains(&data, name.as_bytes()),
            "the file name {name} in the backup"
        );
    }
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    for form in key_forms(&dek) {
        assert!(!contains(&data, &form), "the DEK in the backup");
        assert!(!contains(&manifest_bytes, &form), "the DEK in the manifest");
    }
    // The checks can see a key: the wrapped DEK's base64 is in the data (the header).
    let wrapped = header(&node, &src)["kms"]["wrapped"]["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        contains(&data, &wrapped.as_bytes()[..32]),
        "no header in the backup"
    );

    // Another node (its own pool and state directory) restores it from Blob.
    let (other, mut oc) = node_with_backup(&azure, &[], &[]).await;
    let got = oc
        .controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(got.ready_to_use);
    assert_eq!(got.source_volume_id, src);
    // ListSnapshots by id (what csi-snapshotter asks for a pre-provisioned content) too.
    let listed = oc
        .controller
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].snapshot.as_ref().unwrap().ready_to_use);
    // A StorageClass with another key is refused, and nothing is left of the attempt.
    let secret = azure.params("keyvault-secret");
    let s = oc
        .controller
        .create_volume(restore_request("pvc-other-key", &id, &refs(&secret)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(other.pool_files().is_empty(), "{:?}", other.pool_files());
    let p = params(&azure);
    let restored = oc
        .controller
        .create_volume(restore_request("pvc-restored", &id, &refs(&p)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let h = header(&other, &restored);
    assert!(h["backup"].is_null(), "{h}");
    assert_eq!(h["source"], id.as_str());
    assert_eq!(h["lifecycle"], "persistent");
    oc.node
        .node_stage_volume(other.stage(&restored))
        .await
        .unwrap();
    // An identity Key Vault does not authorize opens nothing.
    let refused = oc
        .node
        .node_publish_volume(publish_as(
            &other,
            &restored,
            "x",
            &azure.token("intruder"),
            "intruder",
        ))
        .await
        .unwrap_err();
    // The volume names the app's identity, which trusts no token of the intruder's account.
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        std::fs::read_dir(other.target_path("x", &restored))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "something is mounted for the intruder"
    );
    oc.node
        .node_publish_volume(publish_as(
            &other,
            &restored,
            "b",
            &azure.token("app"),
            "app",
        ))
        .await
        .unwrap();
    let target = other.target_path("b", &restored);
    for (name, bytes) in &files {
        let back = std::fs::read(format!("{target}/{name}")).unwrap();
        assert_eq!(sha(&back), sha(bytes), "{name} differs after the restore");
    }
    oc.node
        .node_unpublish_volume(other.unpublish(&restored, "b"))
        .await
        .unwrap();
    oc.node
        .node_unstage_volume(other.unstage(&restored))
        .await
        .unwrap();
    oc.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: restored,
            ..Default::default()
        })
        .await
        .unwrap();

    // A backup whose block does not match its manifest is refused, and leaves nothing.
    let writer = container_as(&azure, DRIVER, azure.driver_token());
    let mut tampered = manifest.clone();
    let last = tampered["blocks"].as_array().unwrap().len() - 1;
    tampered["blocks"][last] = json!("00".repeat(32));
    writer
        .blob_client(&format!("{id}/manifest.json"))
        .upload(
            azure_core::http::RequestContent::from(serde_json::to_vec(&tampered).unwrap()),
            None,
        )
        .await
        .unwrap();
    let s = oc
        .controller
        .create_volume(restore_request("pvc-tampered", &id, &refs(&p)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DataLoss, "{s:?}");
    assert!(other.pool_files().is_empty(), "{:?}", other.pool_files());

    // Deleting the snapshot deletes its backup and wipes the local copy.
    c.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        blob(&reader, &format!("{id}/manifest.json"))
            .await
            .is_none()
    );
    assert!(blob(&reader, &format!("{id}/data")).await.is_none());
    assert!(node.pool_files().iter().all(|f| !f.contains(".snap")));
    let gone = oc
        .controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    teardown(&node, &mut c, &src, "a").await;
    assert_clean(&node);
    assert_clean(&other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_killed_during_the_upload_resumes_it_and_reports_nothing_half_done() {
    let azure = Azure::start_with_blob().await;
    // Dies once the container has taken the first block.
    let (mut node, mut c) =
        node_with_backup(&azure, &[], &[("SEALVOL_CRASH_AT", "backup.block_staged")]).await;
    let files = [("data", pattern(3, 24 << 20))];
    let src = volume_with(&azure, &node, &mut c, "pvc-kill", &files).await;
    let req = backup_request("snap-kill", &src, &azure.container_url());
    let first = c.controller.create_snapshot(req.clone()).await;
    if let Ok(r) = &first {
        assert!(
            !r.get_ref().snapshot.as_ref().unwrap().ready_to_use,
            "ready before its upload"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.try_wait().is_none() {
        assert!(Instant::now() < deadline, "the driver did not die");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);
    let id = sealvol_snapshot_id(&node);
    let reader = container_as(&azure, READER, azure.token("reader"));
    assert!(
        blob(&reader, &format!("{id}/manifest.json"))
            .await
            .is_none(),
        "a manifest for a half upload"
    );
    // Another node does not find a half backup.
    let (other, mut oc) = node_with_backup(&azure, &[], &[]).await;
    let missing = oc
        .controller
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // The restarted driver resumes: the staged blocks are not sent again.
    let staged_before = azure.emu.count("blob.put_block", Some(201));
    let mut c = node.start(&[]).await.unwrap();
    let snap = until_ready(&mut c, req).await;
    assert_eq!(snap.snapshot_id, id);
    let staged_after = azure.emu.count("blob.put_block", Some(201));
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(&reader, &format!("{id}/manifest.json")).await.unwrap())
            .unwrap();
    let blocks = manifest["blocks"].as_array().unwrap().len() as u64;
    assert!(staged_before >= 1, "nothing was staged before the kill");
    // The resumed upload says how many blocks it found in the container.
    let reused = node
        .log()
        .lines()
        .filter(|l| l.contains("snapshot backed up"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["blocks_already_there"].as_u64())
        .next_back();
    assert!(
        reused.is_some_and(|n| n >= 1),
        "no block of the first attempt was reused: {reused:?}"
    );
    assert_eq!(
        staged_after - staged_before,
        blocks - reused.unwrap_or_default(),
        "blocks sent again after the restart"
    );

    // And the backup is whole: it restores elsewhere to the same bytes.
    let p = params(&azure);
    let restored = oc
        .controller
        .create_volume(restore_request("pvc-kill-restored", &id, &refs(&p)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    oc.node
        .node_stage_volume(other.stage(&restored))
        .await
        .unwrap();
    oc.node
        .node_publish_volume(publish_as(
            &other,
            &restored,
            "b",
            &azure.token("app"),
            "app",
        ))
        .await
        .unwrap();
    let back = std::fs::read(format!("{}/data", other.target_path("b", &restored))).unwrap();
    assert_eq!(sha(&back), sha(&files[0].1));
    teardown(&other, &mut oc, &restored, "b").await;
    c.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
    teardown(&node, &mut c, &src, "a").await;
    assert_clean(&node);
    assert_clean(&other);
}

/// The id of the one snapshot file in `node`'s pool (complete, `.snap`).
fn sealvol_snapshot_id(node: &ScratchNode) -> String {
    let snaps: Vec<String> = node
        .pool_files()
        .into_iter()
        .filter_map(|f| f.strip_suffix(".snap").map(str::to_string))
        .collect();
    assert_eq!(snaps.len(), 1, "{:?}", node.pool_files());
    snaps[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_that_cannot_be_made_are_refused_with_what_to_do() {
    let azure = Azure::start_with_blob().await;
    let (node, mut c) =
        node_with_backup(&azure, &["--allowed-key-modes=none,keyvault-key"], &[]).await;
    let files = [("data", pattern(5, 1 << 20))];
    let src = volume_with(&azure, &node, &mut c, "pvc-refused", &files).await;

    // A container this node does not allow.
    let other_container = format!("{}/elsewhere", azure.emu.blob_url(ACCOUNT).unwrap());
    let s = c
        .controller
        .create_snapshot(backup_request("snap-x", &src, &other_container))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("backupURL") && s.message().contains(&azure.container_url()),
        "{}",
        s.message()
    );
    // Not a container URL at all.
    for bad in [
        "http://127.0.0.1/a/b",
        "https://x/a/b?sig=1",
        "https://x/",
        "https://x/../etc",
    ] {
        let s = c
            .controller
            .create_snapshot(backup_request("snap-x", &src, bad))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{bad}: {s:?}");
    }
    // keyMode none: its data is plaintext, so it does not leave the node.
    let plain = create_with(&mut c, "pvc-plain", 32 * MIB, &[("keyMode", "none")]).await;
    let s = c
        .controller
        .create_snapshot(backup_request("snap-plain", &plain, &azure.container_url()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("keyMode none"), "{}", s.message());

    // The Blob service failing: not ready, and ready once it is back.
    azure.emu.inject_fault(sealvol_azure_emulator::FaultSpec {
        route: "blob.put_block".into(),
        kind: sealvol_azure_emulator::FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: Some(20),
        duration_ms: None,
        client_id: None,
    });
    let req = backup_request("snap-flaky", &src, &azure.container_url());
    let mut saw_error = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match create_snapshot(&mut c, &req).await {
            Ok(snap) if snap.ready_to_use => break,
            Ok(_) => {}
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                saw_error = true;
            }
        }
        assert!(Instant::now() < deadline, "never ready after the faults");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(saw_error, "the failing uploads were not reported");

    // The same snapshot asked for without its backup, or to another container, is not it.
    let s = c
        .controller
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: src.clone(),
            name: "snap-flaky".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");

    // The driver's identity without its Blob role: refused, never ready, and said why.
    let role = sealvol_azure_emulator::RoleAssignment {
        principal: DRIVER_OID.into(),
        role: "Storage Blob Data Contributor".into(),
        scope: format!("/storageAccounts/{ACCOUNT}/containers/{CONTAINER}"),
    };
    assert!(azure.emu.revoke_role(&role));
    let req = backup_request("snap-norole", &src, &azure.container_url());
    let deadline = Instant::now() + Duration::from_secs(60);
    let refusal = loop {
        match create_snapshot(&mut c, &req).await {
            Ok(snap) => assert!(!snap.ready_to_use),
            Err(s) => break s,
        }
        assert!(Instant::now() < deadline, "no refusal reported");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(refusal.code(), Code::FailedPrecondition, "{refusal:?}");
    assert!(
        refusal.message().contains("Storage Blob Data Contributor"),
        "{}",
        refusal.message()
    );
    azure.emu.assign_role(role);
    // The next call reports the last failure once more and starts the upload again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match create_snapshot(&mut c, &req).await {
            Ok(snap) if snap.ready_to_use => break,
            Ok(_) => {}
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
        }
        assert!(Instant::now() < deadline, "never ready with the role back");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    for name in ["snap-flaky", "snap-norole"] {
        let id = c
            .controller
            .create_snapshot(backup_request(name, &src, &azure.container_url()))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id;
        c.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: plain,
            ..Default::default()
        })
        .await
        .unwrap();
    teardown(&node, &mut c, &src, "a").await;
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_deleted_during_its_upload_leaves_no_backup_and_no_staged_block() {
    let azure = Azure::start_with_blob().await;
    // Each staged block waits a second, so the delete comes mid-upload.
    let (node, mut c) = node_with_backup(
        &azure,
        &[],
        &[("SEALVOL_PAUSE_AT", "backup.block_staged:1000")],
    )
    .await;
    let files = [("data", pattern(4, 20 << 20))];
    let src = volume_with(&azure, &node, &mut c, "pvc-del", &files).await;
    let snap = c
        .controller
        .create_snapshot(backup_request("snap-del", &src, &azure.container_url()))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(!snap.ready_to_use, "ready before its upload");
    let id = snap.snapshot_id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while azure.emu.count("blob.put_block", Some(201)) == 0 {
        assert!(Instant::now() < deadline, "no block was staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delete = csi::DeleteSnapshotRequest {
        snapshot_id: id.clone(),
        ..Default::default()
    };
    let first = c.controller.delete_snapshot(delete.clone()).await;
    assert_eq!(
        first.unwrap_err().code(),
        Code::Aborted,
        "the upload was not stopped"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.controller.delete_snapshot(delete.clone()).await {
            Ok(_) => break,
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
        assert!(Instant::now() < deadline, "the upload never stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reader = container_as(&azure, READER, azure.token("reader"));
    assert!(
        blob(&reader, &format!("{id}/manifest.json"))
            .await
            .is_none()
    );
    // No committed blob, and no block left staged (they hold the wrapped DEK too).
    let staged = reader
        .blob_client(&format!("{id}/data"))
        .block_blob_client()
        .get_block_list(azure_storage_blob::models::BlockListType::All, None)
        .await;
    match staged {
        Err(e) => assert_eq!(e.http_status().map(u16::from), Some(404), "{e}"),
        Ok(r) => {
            let list = r.into_model().unwrap();
            let n = list.committed_blocks.unwrap_or_default().len()
                + list.uncommitted_blocks.unwrap_or_default().len();
            assert_eq!(n, 0, "blocks left in the container");
        }
    }
    assert!(node.pool_files().iter().all(|f| !f.contains(".snap")));
    teardown(&node, &mut c, &src, "a").await;
    assert_clean(&node);
}
