//! A fake Kubernetes API for the cleanup controller and the node plugin's lost-volume check:
//! Nodes (list), PersistentVolumes (list, merge patch, delete with finalizers as the API server
//! treats them), Leases (get, create, replace with resourceVersion conflicts) and Events
//! (create). Every mutation is recorded with the bearer token that made it and who held the
//! lease at that moment, so a test can tell which replica acted and whether it was leading.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Mutation {
    pub method: String,
    pub path: String,
    pub token: String,
    /// The lease's holderIdentity when the request arrived.
    pub lease_holder: Option<String>,
}

#[derive(Default)]
pub struct Objects {
    pub nodes: Vec<String>,
    pub pvs: BTreeMap<String, Value>,
    pub leases: BTreeMap<String, Value>,
    pub events: Vec<Value>,
    pub mutations: Vec<Mutation>,
    /// GETs of the PV list, to know how many passes a controller made.
    pub pv_lists: u64,
    /// Answer the node list with this status instead (a broken API).
    pub nodes_status: Option<u16>,
    pub resource_version: u64,
}

impl Objects {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn holder(&self) -> Option<String> {
        self.leases
            .values()
            .next()
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }

    pub fn lease(&self, name: &str) -> Option<Value> {
        self.leases.get(name).cloned()
    }
}

pub type Shared = Arc<Mutex<Objects>>;

/// A PV of `driver` as external-provisioner makes one: pinned to `node`, bound to
/// `ns/claim-<name>` unless `phase` says otherwise, with both of its usual finalizers.
pub fn pv(name: &str, driver: &str, volume_id: &str, node: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "uid": format!("uid-pv-{name}"),
            "finalizers": ["kubernetes.io/pv-protection", "external-provisioner.volume.kubernetes.io/finalizer"]
        },
        "spec": {
            "capacity": {"storage": "1Gi"},
            "csi": {"driver": driver, "volumeHandle": volume_id},
            "claimRef": {"kind": "PersistentVolumeClaim", "namespace": "team", "name": format!("claim-{name}"), "uid": format!("uid-{name}")},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.sealvol.io/node", "operator": "In", "values": [node]}
            ]}]}}
        },
        "status": {"phase": phase}
    })
}

fn token(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

fn record(objects: &mut Objects, method: &Method, uri: &Uri, headers: &HeaderMap) {
    let lease_holder = objects.holder();
    objects.mutations.push(Mutation {
        method: method.to_string(),
        path: uri.path().to_string(),
        token: token(headers),
        lease_holder,
    });
}

fn list(kind: &str, items: Vec<Value>) -> Response {
    Json(json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items}))
}

#[allow(non_snake_case)]
fn Json(v: Value) -> Response {
    axum::Json(v).into_response()
}

/// Applies an RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn has_finalizers(pv: &Value) -> bool {
    pv["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// Serves the fake on 127.0.0.1; its URL and its objects.
pub async fn serve(objects: Objects) -> (String, Shared) {
    let shared: Shared = Arc::new(Mutex::new(objects));
    let app = axum::Router::new()
        .route(
            "/api/v1/nodes",
            axum::routing::get(|State(s): State<Shared>| async move {
                let o = s.lock().unwrap();
                if let Some(status) = o.nodes_status {
                    return StatusCode::from_u16(status).unwrap().into_response();
                }
                let items = o
                    .nodes
                    .iter()
                    .map(|n| json!({"metadata": {"name": n}}))
                    .collect();
                list("NodeList", items)
            }),
        )
        .route(
            "/api/v1/persistentvolumes",
            axum::routing::get(|State(s): State<Shared>| async move {
                let mut o = s.lock().unwrap();
                o.pv_lists += 1;
                list("PersistentVolumeList", o.pvs.values().cloned().collect())
            }),
        )
        .route(
            "/api/v1/persistentvolumes/{name}",
            axum::routing::patch(
                |State(s): State<Shared>,
                 Path(name): Path<String>,
                 method: Method,
                 uri: Uri,
                 headers: HeaderMap,
                 body: String| async move {
                    let mut o = s.lock().unwrap();
                    record(&mut o, &method, &uri, &headers);
                    let patch: Value = serde_json::from_str(&body).unwrap();
                    let Some(pv) = o.pvs.get_mut(&name) else {
                        return StatusCode::NOT_FOUND.into_response();
                    };
                    merge(pv, &patch);
                    let gone =
                        pv["metadata"]["deletionTimestamp"].is_string() && !has_finalizers(pv);
                    let answer = pv.clone();
                    if gone {
                        o.pvs.remove(&name);
                    }
                    Json(answer)
                },
            )
            .delete(
                |State(s): State<Shared>,
                 Path(name): Path<String>,
                 method: Method,
                 uri: Uri,
                 headers: HeaderMap,
                 body: String| async move {
                    let mut o = s.lock().unwrap();
                    record(&mut o, &method, &uri, &headers);
                    let Some(pv) = o.pvs.get_mut(&name) else {
                        return StatusCode::NOT_FOUND.into_response();
                    };
                    let options: Value = serde_json::from_str(&body).unwrap_or_default();
                    let wanted = &options["preconditions"]["uid"];
                    if !wanted.is_null() && *wanted != pv["metadata"]["uid"] {
                        return StatusCode::CONFLICT.into_response();
                    }
                    if has_finalizers(pv) {
                        pv["metadata"]["deletionTimestamp"] = json!("2026-11-26T00:00:00Z");
                        Json(pv.clone())
                    } else {
                        let pv = o.pvs.remove(&name);
                        Json(pv.unwrap_or_default())
                    }
                },
            ),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            axum::routing::post(
                |State(s): State<Shared>,
                 method: Method,
                 uri: Uri,
                 headers: HeaderMap,
                 body: String| async move {
                    let mut o = s.lock().unwrap();
                    record(&mut o, &method, &uri, &headers);
                    let mut lease: Value = serde_json::from_str(&body).unwrap();
                    let name = lease["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    if o.leases.contains_key(&name) {
                        return StatusCode::CONFLICT.into_response();
                    }
                    lease["metadata"]["resourceVersion"] = json!(o.next_version());
                    o.leases.insert(name, lease.clone());
                    (StatusCode::CREATED, axum::Json(lease)).into_response()
                },
            ),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            axum::routing::get(
                |State(s): State<Shared>, Path((_ns, name)): Path<(String, String)>| async move {
                    match s.lock().unwrap().leases.get(&name) {
                        Some(l) => Json(l.clone()),
                        None => StatusCode::NOT_FOUND.into_response(),
                    }
                },
            )
            .put(
                |State(s): State<Shared>,
                 Path((_ns, name)): Path<(String, String)>,
                 method: Method,
                 uri: Uri,
                 headers: HeaderMap,
                 body: String| async move {
                    let mut o = s.lock().unwrap();
                    record(&mut o, &method, &uri, &headers);
                    let mut lease: Value = serde_json::from_str(&body).unwrap();
                    let current = o
                        .leases
                        .get(&name)
                        .map(|l| l["metadata"]["resourceVersion"].clone());
                    match current {
                        None => return StatusCode::NOT_FOUND.into_response(),
                        Some(v) if v != lease["metadata"]["resourceVersion"] => {
                            return StatusCode::CONFLICT.into_response();
                        }
                        Some(_) => {}
                    }
                    lease["metadata"]["resourceVersion"] = json!(o.next_version());
                    o.leases.insert(name, lease.clone());
                    Json(lease)
                },
            ),
        )
        .route(
            "/api/v1/namespaces/{ns}/events",
            axum::routing::post(
                |State(s): State<Shared>,
                 method: Method,
                 uri: Uri,
                 headers: HeaderMap,
                 body: String| async move {
                    let mut o = s.lock().unwrap();
                    record(&mut o, &method, &uri, &headers);
                    o.events.push(serde_json::from_str(&body).unwrap());
                    StatusCode::CREATED.into_response()
                },
            ),
        )
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, shared)
}

/// Polls `check` on the objects every 50 ms until it holds or `within` has passed.
pub async fn wait_for(
    shared: &Shared,
    within: std::time::Duration,
    check: impl Fn(&Objects) -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if check(&shared.lock().unwrap()) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
