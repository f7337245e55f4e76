//! Every object under deploy/ (the chart rendered with the default values and each example
//! values file, and the example workloads) is a valid Kubernetes object: it deserializes into
//! its k8s-openapi type (API 1.35), and serializing that back gives the same object, so no
//! field is unknown or misspelled. deploy/ itself is checked against the chart by
//! hack/chart/test_chart.py.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use serde::Deserialize;
use serde::de::DeserializeOwned;

fn manifests() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("rendered"), root.join("examples")] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "yaml") {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files
}

fn roundtrip<T: DeserializeOwned + serde::Serialize>(doc: &serde_json::Value) -> serde_json::Value {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    serde_json::to_value(typed).unwrap()
}

fn check(doc: &serde_json::Value) -> String {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let back = match (api, kind) {
        ("v1", "ServiceAccount") => roundtrip::<ServiceAccount>(doc),
        ("v1", "Pod") => roundtrip::<Pod>(doc),
        ("v1", "PersistentVolumeClaim") => roundtrip::<PersistentVolumeClaim>(doc),
        ("apps/v1", "DaemonSet") => roundtrip::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => roundtrip::<Deployment>(doc),
        ("storage.k8s.io/v1", "CSIDriver") => roundtrip::<CSIDriver>(doc),
        ("storage.k8s.io/v1", "StorageClass") => roundtrip::<StorageClass>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => roundtrip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            roundtrip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => roundtrip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => roundtrip::<RoleBinding>(doc),
        other => panic!("deploy/ holds a {other:?}, which this test does not know"),
    };
    assert_eq!(
        &back, doc,
        "{kind} has a field its type does not know (or a value of the wrong type)"
    );
    format!("{api}/{kind}")
}

#[test]
fn every_deployed_object_is_a_valid_kubernetes_object() {
    let files = manifests();
    assert!(files.len() >= 7, "{files:?}");
    let mut kinds = std::collections::BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if value.is_null() {
                continue;
            }
            kinds.insert(check(&value));
        }
    }
    for k in [
        "storage.k8s.io/v1/CSIDriver",
        "apps/v1/DaemonSet",
        "apps/v1/Deployment",
        "storage.k8s.io/v1/StorageClass",
        "v1/Pod",
        "v1/PersistentVolumeClaim",
    ] {
        assert!(kinds.contains(k), "no {k} in deploy/");
    }
}

#[test]
fn a_misspelled_field_is_caught() {
    let doc: serde_json::Value = serde_json::json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": {"name": "x"},
        "spec": {"attachRequired": false, "podInfoOnMount": true, "requiresRepublsh": true}
    });
    assert!(std::panic::catch_unwind(|| check(&doc)).is_err());
}
