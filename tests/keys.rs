//! Identity-gated key release end to end: real fscrypt on real ext4, the node plugin talking
//! to the Azure emulator over HTTPS with the pod's own token, and every refusal failing closed.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use common::azure::*;
use sealvol::harness::keys::{key_present, with_pod_token};
use sealvol_azure_emulator::{FaultKind, FaultSpec, RoleAssignment};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_is_encrypted_and_the_key_leaves_with_the_pod() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let id = create_encrypted(&mut c, &azure, "pvc-enc", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    let before = azure.wraps();
    c.node
        .node_publish_volume(publish_as(&node, &id, "pod-a", &azure.token("app"), "app"))
        .await
        .unwrap();
    assert_eq!(azure.wraps(), before + 1, "one wrap on the first publish");
    assert_eq!(
        azure.unwraps(),
        1,
        "and one unwrap by the pod's own identity, which is the authorization check"
    );
    let target = node.target_path("pod-a", &id);
    let marker = b"SEALVOL-PLAINTEXT-MARKER-91c7";
    std::fs::write(
        format!("{target}/secret-file-name.txt"),
        marker.repeat(40_000),
    )
    .unwrap();
    nix::unistd::sync();
    let img = node.pool_dir.join(format!("{id}.img"));
    let raw = std::fs::read(&img).unwrap();
    assert!(
        !contains(&raw, marker),
        "plaintext reached the backing file"
    );
    assert!(
        !contains(&raw, b"secret-file-name"),
        "a plaintext file name reached the backing file"
    );
    assert!(allocated_bytes(&img) > 1 << 20, "the ciphertext is there");

    // Republish: no Key Vault call.
    let calls = (azure.wraps(), azure.unwraps());
    for _ in 0..3 {
        c.node
            .node_publish_volume(publish_as(&node, &id, "pod-a", &azure.token("app"), "app"))
            .await
            .unwrap();
    }
    assert_eq!((azure.wraps(), azure.unwraps()), calls);

    let staging = node.staging_path(&id);
    let ident = identifier(&node, &id);
    assert!(key_present(std::path::Path::new(&staging), &ident).unwrap());
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod-a"))
        .await
        .unwrap();
    assert!(
        !key_present(std::path::Path::new(&staging), &ident).unwrap(),
        "the key is evicted"
    );
    // Names and contents are unreadable now.
    let names: Vec<String> = std::fs::read_dir(format!("{staging}/data"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1);
    assert!(!names[0].contains("secret-file-name"), "{names:?}");
    let err = std::fs::read(format!("{staging}/data/{}", names[0])).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOKEY), "{err}");

    // A second publication unwraps with the pod's token, and the data is intact.
    c.node
        .node_publish_volume(publish_as(&node, &id, "pod-b", &azure.token("app"), "app"))
        .await
        .unwrap();
    assert_eq!(azure.unwraps(), 2);
    assert_eq!(
        std::fs::read(format!(
            "{}/secret-file-name.txt",
            node.target_path("pod-b", &id)
        ))
        .unwrap(),
        marker.repeat(40_000)
    );
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod-b"))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert!(!img.exists());
    assert_clean(&node);
    let log = node.log();
    for event in [
        "\"generate\"",
        "\"wrap\"",
        "\"unwrap\"",
        "\"evict\"",
        "\"wipe\"",
    ] {
        assert!(log.contains(event), "no audit line for {event}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dek_is_in_no_log_and_no_file() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let id = create_encrypted(&mut c, &azure, "pvc-dek", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    let token = azure.token("app");
    c.node
        .node_publish_volume(publish_as(&node, &id, "p", &token, "app"))
        .await
        .unwrap();
    std::fs::write(format!("{}/f", node.target_path("p", &id)), b"data").unwrap();
    nix::unistd::sync();
    // Unwrap the DEK with the emulator's own key material: the plaintext key, to look for.
    let h = header(&node, &id);
    let wrapped = base64_decode(h["kms"]["wrapped"]["ciphertext"].as_str().unwrap());
    let material = {
        let state = azure.emu.shared.lock();
        state.vaults["kv"].keys["kek"][0].material.clone()
    };
    let der = sealvol_azure_emulator::crypto::b64_decode(&material).unwrap();
    let dek = sealvol_azure_emulator::crypto::rsa_decrypt(&der, "RSA-OAEP-256", &wrapped).unwrap();
    assert_eq!(dek.len(), 64);
    let hex: String = dek.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = sealvol_azure_emulator::crypto::b64(&dek);
    let log = node.log();
    for needle in [hex.as_bytes(), b64.as_bytes(), &dek[..]] {
        assert!(!contains(log.as_bytes(), needle), "the DEK is in the log");
    }
    assert!(
        !log.contains(token.rsplit('.').next().unwrap()),
        "the pod's token is in the log"
    );
    let mut files = Vec::new();
    for dir in [&node.state_dir, &node.pool_dir] {
        collect(dir, &mut files);
    }
    assert!(!files.is_empty());
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for needle in [hex.as_bytes(), b64.as_bytes(), &dek[..]] {
            assert!(!contains(&bytes, needle), "the DEK is in {}", f.display());
        }
    }
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            collect(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// Publishes with `req`; the call must fail with `code` and leave nothing mounted at the target.
async fn refused_publish(
    c: &mut CsiClient,
    node: &ScratchNode,
    req: csi::NodePublishVolumeRequest,
    want: Code,
) -> String {
    let target = req.target_path.clone();
    let s = refused(c.node.node_publish_volume(req).await);
    assert_eq!(s.code(), want, "{}", s.message());
    assert!(!is_mounted(&target), "a refused publish left a mount");
    let _ = node;
    s.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_fail_closed_with_the_right_codes() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let id = create_encrypted(&mut c, &azure, "pvc-refuse", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    // No token at all.
    let no_token = node.publish(&id, "p0");
    refused_publish(&mut c, &node, no_token, Code::Unauthenticated).await;
    // An identity with a federated credential but no role on the key.
    let mut intruder = publish_as(&node, &id, "p1", &azure.token("intruder"), "intruder");
    let _ = &mut intruder;
    // The volume's clientID is the app's: the intruder's token is not federated to it.
    let m = refused_publish(&mut c, &node, intruder, Code::Unauthenticated).await;
    assert!(m.contains("AADSTS70021"), "{m}");
    // Forged (signed by another issuer's key, claiming the cluster issuer), expired, wrong audience.
    let good = azure.token("app");
    let (header, claims) = sealvol_azure_emulator::crypto::peek_jwt(&good).unwrap();
    let forger = sealvol_azure_emulator::crypto::SigningKey::generate().unwrap();
    let forged = forger.sign(&claims).unwrap();
    let _ = header;
    let m = refused_publish(
        &mut c,
        &node,
        publish_as(&node, &id, "p2", &forged, "app"),
        Code::Unauthenticated,
    )
    .await;
    assert!(m.contains("AADSTS50013"), "{m}");
    let expired = azure.token_with("app", AUD, -7200, "cluster");
    refused_publish(
        &mut c,
        &node,
        publish_as(&node, &id, "p3", &expired, "app"),
        Code::Unauthenticated,
    )
    .await;
    let wrong_aud = azure.token_with("app", "https://kubernetes.default.svc", 0, "cluster");
    refused_publish(
        &mut c,
        &node,
        publish_as(&node, &id, "p4", &wrong_aud, "app"),
        Code::Unauthenticated,
    )
    .await;
    // A token that names another service account than the pod's.
    let mut mismatch = publish_as(&node, &id, "p5", &good, "app");
    mismatch.volume_context.insert(
        "csi.storage.k8s.io/serviceAccount.name".into(),
        "other".into(),
    );
    refused_publish(&mut c, &node, mismatch, Code::Unauthenticated).await;
    assert_eq!(azure.wraps(), 0, "no refusal reached Key Vault's wrap");

    // Role removed: PERMISSION_DENIED.
    let role = RoleAssignment {
        principal: APP_OID.into(),
        role: "Key Vault Crypto Service Encryption User".into(),
        scope: "/vaults/kv/keys/kek".into(),
    };
    assert!(azure.emu.revoke_role(&role));
    refused_publish(
        &mut c,
        &node,
        publish_as(&node, &id, "p6", &good, "app"),
        Code::PermissionDenied,
    )
    .await;
    azure.emu.assign_role(role);
    c.node
        .node_publish_volume(publish_as(&node, &id, "p7", &good, "app"))
        .await
        .unwrap();
    c.node
        .node_unpublish_volume(node.unpublish(&id, "p7"))
        .await
        .unwrap();

    // Key disabled: PERMISSION_DENIED.
    {
        let mut state = azure.emu.shared.lock();
        for v in state
            .vaults
            .get_mut("kv")
            .unwrap()
            .keys
            .get_mut("kek")
            .unwrap()
        {
            v.enabled = false;
        }
    }
    refused_publish(
        &mut c,
        &node,
        publish_as(&node, &id, "p8", &good, "app"),
        Code::PermissionDenied,
    )
    .await;
    let staging = node.staging_path(&id);
    assert!(
        !key_present(std::path::Path::new(&staging), &identifier(&node, &id)).unwrap(),
        "a refusal left the key in the kernel"
    );
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
    let log = node.log();
    assert!(log.contains("\"denial\""), "no audit line for the denials");
    for token in [&good, &forged, &expired, &wrong_aud] {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a refused token reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cache_never_serves_another_service_account() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let id = create_encrypted(&mut c, &azure, "pvc-cache", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &id, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    let exchanges = azure.emu.count("entra.token", Some(200));
    // Same client id, another service account with its own federated credential: its own
    // exchange, not the cached token of the first.
    c.node
        .node_publish_volume(publish_as(&node, &id, "b", &azure.token("app2"), "app2"))
        .await
        .unwrap();
    assert_eq!(azure.emu.count("entra.token", Some(200)), exchanges + 1);
    // A service account with no federated credential for this client id, while the cache is
    // warm for two others: refused by Entra.
    let s = refused(
        c.node
            .node_publish_volume(publish_as(
                &node,
                &id,
                "c",
                &azure.token("intruder"),
                "intruder",
            ))
            .await,
    );
    assert_eq!(s.code(), Code::Unauthenticated);
    // The same pod token again: served from the cache.
    let t = azure.token("app");
    c.node
        .node_publish_volume(publish_as(&node, &id, "d", &t, "app"))
        .await
        .unwrap();
    let after = azure.emu.count("entra.token", Some(200));
    c.node
        .node_publish_volume(publish_as(&node, &id, "e", &t, "app"))
        .await
        .unwrap();
    assert_eq!(
        azure.emu.count("entra.token", Some(200)),
        after,
        "one exchange per token"
    );
    for pod in ["a", "b", "d", "e"] {
        c.node
            .node_unpublish_volume(node.unpublish(&id, pod))
            .await
            .unwrap();
    }
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vault_latency_throttling_and_outage() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let id = create_encrypted(&mut c, &azure, "pvc-faults", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    let token = azure.token("app");
    // Slow: still works.
    azure.emu.inject_fault(FaultSpec {
        route: "keyvault.wrap".into(),
        kind: FaultKind::Latency { ms: 400 },
        count: Some(1),
        duration_ms: None,
        client_id: None,
    });
    let start = std::time::Instant::now();
    c.node
        .node_publish_volume(publish_as(&node, &id, "a", &token, "app"))
        .await
        .unwrap();
    assert!(start.elapsed() >= std::time::Duration::from_millis(400));
    c.node
        .node_unpublish_volume(node.unpublish(&id, "a"))
        .await
        .unwrap();
    // Throttled twice: retried with backoff, then works.
    azure.emu.inject_fault(FaultSpec {
        route: "keyvault.unwrap".into(),
        kind: FaultKind::Status {
            status: 429,
            retry_after: Some(0),
        },
        count: Some(2),
        duration_ms: None,
        client_id: None,
    });
    c.node
        .node_publish_volume(publish_as(&node, &id, "b", &token, "app"))
        .await
        .unwrap();
    assert_eq!(azure.emu.count("keyvault.unwrap", Some(429)), 2);
    c.node
        .node_unpublish_volume(node.unpublish(&id, "b"))
        .await
        .unwrap();
    // Down: UNAVAILABLE within the retry budget, nothing mounted.
    azure.emu.inject_fault(FaultSpec {
        route: "keyvault.unwrap".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: None,
        duration_ms: None,
        client_id: None,
    });
    let start = std::time::Instant::now();
    refused_publish(
        &mut c,
        &node,
        publish_as(&node, &id, "c", &token, "app"),
        Code::Unavailable,
    )
    .await;
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    // Entra down too (a fresh token needs an exchange).
    azure.emu.inject_fault(FaultSpec {
        route: "entra.token".into(),
        kind: FaultKind::Drop,
        count: None,
        duration_ms: None,
        client_id: None,
    });
    refused_publish(
        &mut c,
        &node,
        publish_as(&node, &id, "d", &azure.token("app"), "app"),
        Code::Unavailable,
    )
    .await;
    azure.emu.clear_faults();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_publish_and_unpublish_still_evicts_and_wipes() {
    let azure = Azure::start().await;
    let (mut node, mut c) = node_for(&azure).await;
    let id = create_encrypted(&mut c, &azure, "pvc-restart", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &id, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    std::fs::write(format!("{}/f", node.target_path("a", &id)), b"x").unwrap();
    let ident = identifier(&node, &id);
    node.kill();
    let mut c = node.start(&[]).await.unwrap();
    let staging = node.staging_path(&id);
    assert!(
        key_present(std::path::Path::new(&staging), &ident).unwrap(),
        "a restart does not take the key from a running pod"
    );
    c.node
        .node_unpublish_volume(node.unpublish(&id, "a"))
        .await
        .unwrap();
    assert!(!key_present(std::path::Path::new(&staging), &ident).unwrap());
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_mode_hsm_keys_rotation_and_inline_volumes() {
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    for (name, mode) in [
        ("pvc-secret", "keyvault-secret"),
        ("pvc-hsm", "hsm"),
        ("pvc-rot", "keyvault-key"),
    ] {
        let id = create_encrypted(&mut c, &azure, name, mode).await;
        c.node.node_stage_volume(node.stage(&id)).await.unwrap();
        c.node
            .node_publish_volume(publish_as(&node, &id, "a", &azure.token("app"), "app"))
            .await
            .unwrap();
        std::fs::write(format!("{}/f", node.target_path("a", &id)), name).unwrap();
        c.node
            .node_unpublish_volume(node.unpublish(&id, "a"))
            .await
            .unwrap();
        if mode == "keyvault-key" {
            // Rotate the KEK: the volume wrapped under the old version still opens.
            let spec = sealvol_azure_emulator::KeySpec {
                name: "kek".into(),
                kty: "RSA".into(),
                size: Some(2048),
            };
            azure.emu.shared.lock().create_key("kv", &spec).unwrap();
        }
        c.node
            .node_publish_volume(publish_as(&node, &id, "b", &azure.token("app"), "app"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(format!("{}/f", node.target_path("b", &id))).unwrap(),
            name,
            "{mode}"
        );
        c.node
            .node_unpublish_volume(node.unpublish(&id, "b"))
            .await
            .unwrap();
        c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
        delete(&mut c, &id).await.unwrap();
    }
    // An inline volume: created, keyed and published by one call, wiped by its unpublish.
    let inline = format!("csi-{}", "e".repeat(64));
    let mut req = node.publish(&inline, "inline-pod");
    req.staging_target_path = String::new();
    req.volume_context
        .insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    req.volume_context.insert("size".into(), "32Mi".into());
    for (k, v) in azure.params("keyvault-key") {
        req.volume_context.insert(k, v);
    }
    let mut refused_req = req.clone();
    with_pod_token(
        &mut refused_req,
        &azure.token("intruder"),
        AUD,
        "default",
        "intruder",
        false,
    );
    let s = refused(c.node.node_publish_volume(refused_req).await);
    assert_eq!(s.code(), Code::Unauthenticated);
    // Kept, keyless and unpublished, for kubelet's retries (tests/refused_inline.rs).
    assert!(!is_mounted(&node.target_path("inline-pod", &inline)));
    assert!(header(&node, &inline)["kms"]["wrapped"].is_null());
    with_pod_token(&mut req, &azure.token("app"), AUD, "default", "app", false);
    c.node.node_publish_volume(req).await.unwrap();
    std::fs::write(
        format!("{}/f", node.target_path("inline-pod", &inline)),
        b"scratch",
    )
    .unwrap();
    c.node
        .node_unpublish_volume(node.unpublish(&inline, "inline-pod"))
        .await
        .unwrap();
    assert_clean(&node);
}

/// A fake Kubernetes API that knows two ServiceAccounts: "app", annotated with the app's
/// client id, and "bare", with no annotation. It insists on the driver's bearer token.
async fn fake_kube_api() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use axum::extract::Path as AxPath;
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::{AtomicU64, Ordering};
    let hits = std::sync::Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/api/v1/namespaces/{ns}/serviceaccounts/{name}",
        axum::routing::get(move |AxPath((ns, name)): AxPath<(String, String)>, headers: HeaderMap| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer driver-sa-token") {
                    return (StatusCode::UNAUTHORIZED, String::new());
                }
                let annotations = if name == "app" { json!({"azure.workload.identity/client-id": APP}) } else { json!({}) };
                (StatusCode::OK, json!({"kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns, "annotations": annotations}}).to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_from_service_account_annotations() {
    let azure = Azure::start().await;
    let (api, hits) = fake_kube_api().await;
    // Removed on drop, also when the test fails.
    let token = tempfile::NamedTempFile::new().unwrap();
    let token_file = token.path().to_path_buf();
    std::fs::write(&token_file, "driver-sa-token\n").unwrap();
    let flags = [
        format!("--kube-api-url={api}"),
        format!("--kube-token-file={}", token_file.display()),
    ];
    let (node, mut c) = node_with(
        &azure,
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    // No clientID parameter: the pod's ServiceAccount annotation names it.
    let params: Vec<(String, String)> = azure
        .params("keyvault-key")
        .into_iter()
        .filter(|(k, _)| k != "clientID")
        .collect();
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let id = create_with(&mut c, "pvc-annotated", 32 * MIB, &refs).await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &id, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &id, "b", &azure.token("app"), "app"))
        .await
        .unwrap();
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the answer is cached"
    );
    // A ServiceAccount without the annotation: the message says what to set.
    let s = refused(
        c.node
            .node_publish_volume(publish_as(&node, &id, "c", &azure.token("bare"), "bare"))
            .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("azure.workload.identity/client-id"),
        "{}",
        s.message()
    );
    assert!(!is_mounted(&node.target_path("c", &id)));
    for pod in ["a", "b"] {
        c.node
            .node_unpublish_volume(node.unpublish(&id, pod))
            .await
            .unwrap();
    }
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_with_files_still_open_is_reported_and_finished_later() {
    use std::io::Read;
    let azure = Azure::start().await;
    let (node, mut c) = node_for(&azure).await;
    let id = create_encrypted(&mut c, &azure, "pvc-busy", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &id, "a", &azure.token("app"), "app"))
        .await
        .unwrap();
    let target = node.target_path("a", &id);
    std::fs::write(format!("{target}/open"), b"held open").unwrap();
    std::fs::write(format!("{target}/closed"), b"not open").unwrap();
    nix::unistd::sync();
    // A process on the node keeps a file open through the staging mount.
    let staging = node.staging_path(&id);
    let names: Vec<_> = std::fs::read_dir(format!("{staging}/data"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 2);
    let mut held = std::fs::File::open(format!("{staging}/data/open")).unwrap();
    c.node
        .node_unpublish_volume(node.unpublish(&id, "a"))
        .await
        .expect("unpublish succeeds and reports");
    let ident = identifier(&node, &id);
    assert!(
        !key_present(std::path::Path::new(&staging), &ident).unwrap(),
        "the key secret is wiped"
    );
    // The open file keeps its key until closed; nothing else opens.
    let mut buf = String::new();
    held.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "held open");
    let other = std::fs::read(format!("{staging}/data/closed")).unwrap_err();
    assert_eq!(other.raw_os_error(), Some(libc::ENOKEY));
    assert!(
        node.log().contains("\"files_busy\""),
        "the busy eviction is reported"
    );
    drop(held);
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}
