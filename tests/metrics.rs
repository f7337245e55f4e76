//! The metrics endpoint after a lifecycle and a revocation: the series operators alert on, with
//! the right counts; /healthz; and the Kubernetes event a locked volume posts on its pod.
#![allow(clippy::unwrap_used)]

mod common;
use common::azure::*;
use common::*;

use std::sync::{Arc, Mutex};

use sealvol_azure_emulator::RoleAssignment;

/// The value of the series whose line starts with `prefix` (labels included).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {prefix} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_events_after_a_lifecycle_and_a_revocation() {
    let azure = Azure::start().await;
    let (api, events) = event_sink().await;
    // Removed on drop, also when the test fails.
    let token = tempfile::NamedTempFile::new().unwrap();
    let token_file = token.path().to_path_buf();
    std::fs::write(&token_file, "driver-sa-token").unwrap();
    let flags = [
        "--metrics-address=127.0.0.1:0".to_string(),
        "--reauthorize-interval=0".to_string(),
        format!("--kube-api-url={api}"),
        format!("--kube-token-file={}", token_file.display()),
    ];
    let (node, mut c) = node_with(
        &azure,
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let base = format!("http://{}", metrics_address(&node.log()));
    let http = reqwest::Client::new();
    let scrape = || async {
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let id = create_encrypted(&mut c, &azure, "pvc-metrics", "keyvault-key").await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
        .await
        .unwrap();
    let text = scrape().await;
    assert_eq!(value(&text, "sealvol_volumes{state=\"published\"}"), 1.0);
    assert_eq!(
        value(
            &text,
            "sealvol_csi_operations_total{method=\"NodePublishVolume\",code=\"Ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_azure_requests_total{operation=\"keyvault.wrap\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_azure_requests_total{operation=\"entra.token\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"wrap\",result=\"ok\"}"
        ),
        1.0
    );
    assert!(value(&text, "sealvol_pool_capacity_bytes{pool=\"default\"}") > 0.0);
    assert!(text.contains("sealvol_csi_operation_duration_seconds_bucket"));
    assert!(text.contains("sealvol_azure_request_duration_seconds_bucket"));
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );

    // A revocation: the next republish is a denial and a lock, with an event on the pod.
    let role = RoleAssignment {
        principal: APP_OID.into(),
        role: "Key Vault Crypto Service Encryption User".into(),
        scope: "/vaults/kv/keys/kek".into(),
    };
    azure.emu.revoke_role(&role);
    let s = refused(
        c.node
            .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
            .await,
    );
    assert_eq!(s.code(), Code::PermissionDenied);
    let text = scrape().await;
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"lock\",result=\"locked\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"denial\",result=\"permission_denied\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_azure_requests_total{operation=\"keyvault.unwrap\",outcome=\"denied\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_csi_operations_total{method=\"NodePublishVolume\",code=\"PermissionDenied\"}"
        ),
        1.0
    );
    for _ in 0..50 {
        if !events.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    {
        let events = events.lock().unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["reason"], "VolumeLocked");
        assert_eq!(events[0]["type"], "Warning");
        assert_eq!(events[0]["involvedObject"]["kind"], "Pod");
        assert_eq!(events[0]["involvedObject"]["name"], "pod-app");
    }
    events.lock().unwrap().clear();

    azure.emu.assign_role(role);
    c.node
        .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
        .await
        .unwrap();
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    let text = scrape().await;
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"unlock\",result=\"ok\"}"
        ),
        1.0
    );
    // One eviction when the volume locked, one at the last unpublish.
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"evict\",result=\"ok\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"generate\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"reauthorize\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "sealvol_key_events_total{event=\"wipe\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(value(&text, "sealvol_volumes{state=\"published\"}"), 0.0);
    assert!(value(&text, "sealvol_token_cache_lookups_total{result=\"miss\"}") >= 1.0);

    // A refused pod gets a KeyReleaseDenied event; a deleted PVC's volume a VolumeWiped one.
    let mut params = azure.params("keyvault-key");
    params.push(("csi.storage.k8s.io/pvc/name".into(), "cache-claim".into()));
    params.push(("csi.storage.k8s.io/pvc/namespace".into(), "default".into()));
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let id = create_with(&mut c, "pvc-events", 32 * MIB, &refs).await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    let s = refused(
        c.node
            .node_publish_volume(publish_as(
                &node,
                &id,
                "bad",
                &azure.token("intruder"),
                "intruder",
            ))
            .await,
    );
    assert_eq!(s.code(), Code::Unauthenticated);
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    for _ in 0..50 {
        if events.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    {
        let events = events.lock().unwrap();
        let denied = events
            .iter()
            .find(|e| e["reason"] == "KeyReleaseDenied")
            .expect("a denial event");
        assert_eq!(denied["involvedObject"]["name"], "pod-intruder");
        assert!(
            denied["message"].as_str().unwrap().contains("AADSTS70021"),
            "{denied}"
        );
        let wiped = events
            .iter()
            .find(|e| e["reason"] == "VolumeWiped")
            .expect("a wipe event");
        assert_eq!(wiped["involvedObject"]["kind"], "PersistentVolumeClaim");
        assert_eq!(wiped["involvedObject"]["name"], "cache-claim");
        assert_eq!(wiped["type"], "Normal");
    }
    assert_clean(&node);
}

/// A fake Kubernetes API that records the evictions posted to it (namespace, pod, bearer
/// token, body) and accepts events.
async fn eviction_sink() -> (
    String,
    Arc<Mutex<Vec<(String, String, String, serde_json::Value)>>>,
) {
    use axum::extract::Path as AxPath;
    use axum::http::{HeaderMap, StatusCode};
    let evictions = Arc::new(Mutex::new(Vec::new()));
    let sink = evictions.clone();
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/eviction",
            axum::routing::post(
                move |AxPath((ns, name)): AxPath<(String, String)>,
                      headers: HeaderMap,
                      body: String| {
                    let sink = sink.clone();
                    async move {
                        let bearer = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        sink.lock().unwrap().push((
                            ns,
                            name,
                            bearer,
                            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
                        ));
                        StatusCode::CREATED
                    }
                },
            ),
        )
        .route(
            "/api/v1/namespaces/{ns}/events",
            axum::routing::post(|| async { StatusCode::CREATED }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, evictions)
}

/// `onRevoke: evict`: after the lock, the revoked pod is evicted through the Eviction API
/// (once per lock, not per kubelet retry); a volume with the default `lock` evicts nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_revoke_evict_evicts_the_revoked_pod_once() {
    let azure = Azure::start().await;
    let (api, evictions) = eviction_sink().await;
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "driver-sa-token").unwrap();
    let flags = [
        "--reauthorize-interval=0".to_string(),
        "--revoke-grace=0".to_string(),
        format!("--kube-api-url={api}"),
        format!("--kube-token-file={}", token.path().display()),
    ];
    let (node, mut c) = node_with(
        &azure,
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let mut ids = Vec::new();
    for (name, on_revoke) in [("pvc-evict", "evict"), ("pvc-lock", "lock")] {
        let mut params = azure.params("keyvault-key");
        params.push(("onRevoke".into(), on_revoke.into()));
        let refs: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let id = create_with(&mut c, name, 32 * MIB, &refs).await;
        c.node.node_stage_volume(node.stage(&id)).await.unwrap();
        let mut req = publish_as(&node, &id, "pod", &azure.token("app"), "app");
        req.volume_context.insert(
            "csi.storage.k8s.io/pod.name".into(),
            format!("pod-{on_revoke}"),
        );
        c.node.node_publish_volume(req).await.unwrap();
        ids.push((id, on_revoke));
    }
    assert!(azure.emu.revoke_role(&RoleAssignment {
        principal: APP_OID.into(),
        role: "Key Vault Crypto Service Encryption User".into(),
        scope: "/vaults/kv/keys/kek".into(),
    }));
    for _ in 0..3 {
        for (id, on_revoke) in &ids {
            let mut req = publish_as(&node, id, "pod", &azure.token("app"), "app");
            req.volume_context.insert(
                "csi.storage.k8s.io/pod.name".into(),
                format!("pod-{on_revoke}"),
            );
            assert_eq!(
                code(c.node.node_publish_volume(req).await),
                Code::PermissionDenied
            );
        }
    }
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = evictions.lock().unwrap().clone();
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Give a wrong second eviction the time to arrive.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let seen_now = evictions.lock().unwrap().clone();
    assert_eq!(seen_now.len(), 1, "{seen_now:?}");
    let (ns, name, bearer, body) = &seen[0];
    assert_eq!((ns.as_str(), name.as_str()), ("default", "pod-evict"));
    assert_eq!(bearer, "Bearer driver-sa-token");
    assert_eq!(body["kind"], "Eviction");
    assert_eq!(body["metadata"]["name"], "pod-evict");
    assert!(node.log().contains("revoked pod evicted"), "{}", node.log());
    for (id, _) in &ids {
        c.node
            .node_unpublish_volume(node.unpublish(id, "pod"))
            .await
            .unwrap();
        c.node.node_unstage_volume(node.unstage(id)).await.unwrap();
        delete(&mut c, id).await.unwrap();
    }
    assert_clean(&node);
}
