//! The driver's PersistentVolumes as the Kubernetes API holds them, and what becomes of those
//! no node can serve any more: a node plugin that starts on a pool which no longer holds its
//! PVs' volumes marks them lost (`lost.rs`), and the cleanup controller releases the PVs of
//! nodes that are gone and the ones marked lost (`cleanup.rs`), one replica at a time
//! (`lease.rs`). Objects are k8s-openapi's types, sent through the driver's API client.

mod cleanup;
mod lease;
mod lost;

pub use cleanup::{CleanupConfig, run_cleanup};
pub(crate) use lost::{PoolEvidence, mark_lost_volumes};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::identity::KubeApi;
use crate::identity::path_segment;
use crate::volume::TOPOLOGY_KEY;

/// The annotation a node plugin puts on a PV whose volume its pools no longer hold; its
/// value says why. The cleanup controller releases such PVs.
pub const LOST_ANNOTATION: &str = "sealvol.io/lost";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Kubernetes API: {0}")]
    Api(String),
    /// Someone else changed the object since it was read (HTTP 409).
    #[error("Kubernetes API: {0} was changed by someone else")]
    Conflict(String),
}

/// The calls the node plugin and the cleanup controller make, typed.
pub(crate) struct Cluster<'a> {
    api: &'a KubeApi,
}

const JSON: &str = "application/json";
const MERGE_PATCH: &str = "application/merge-patch+json";

impl<'a> Cluster<'a> {
    pub(crate) fn new(api: &'a KubeApi) -> Cluster<'a> {
        Cluster { api }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<(StatusCode, bytes::Bytes), ClusterError> {
        let what = format!("{method} {path}");
        self.api
            .call(method, path, body)
            .await
            .map_err(|e| ClusterError::Api(format!("{what}: {e}")))
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, ClusterError> {
        let (status, body) = self.send(Method::GET, path, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ClusterError::Api(format!("GET {path}: HTTP {status}")));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| ClusterError::Api(format!("GET {path}: {e}")))
    }

    /// Every item of a list, a page of 500 at a time (`limit` and `continue`), so a large
    /// cluster's list neither times out nor arrives in one piece.
    async fn list_all<T>(&self, path: &str) -> Result<Vec<T>, ClusterError>
    where
        T: k8s_openapi::ListableResource + DeserializeOwned,
    {
        let mut items = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page_path = match &next {
                Some(token) => format!("{path}?limit=500&continue={}", path_segment(token)),
                None => format!("{path}?limit=500"),
            };
            let page: k8s_openapi::List<T> = self
                .get_json(&page_path)
                .await?
                .ok_or_else(|| ClusterError::Api(format!("GET {path}: HTTP 404")))?;
            items.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => next = Some(token),
                None => return Ok(items),
            }
        }
    }

    /// Every PV in the cluster (the API cannot select by `spec.csi.driver`).
    pub(crate) async fn persistent_volumes(&self) -> Result<Vec<PersistentVolume>, ClusterError> {
        self.list_all("/api/v1/persistentvolumes").await
    }

    /// The names of the nodes that exist. An empty list is an error: the caller runs on a
    /// node, so an empty answer is a broken one, and would read as "every node is gone".
    pub(crate) async fn node_names(&self) -> Result<Vec<String>, ClusterError> {
        let nodes: Vec<Node> = self.list_all("/api/v1/nodes").await?;
        let names: Vec<String> = nodes.into_iter().filter_map(|n| n.metadata.name).collect();
        if names.is_empty() {
            return Err(ClusterError::Api(
                "GET /api/v1/nodes: an empty list; not trusted".into(),
            ));
        }
        Ok(names)
    }

    async fn patch_pv(&self, name: &str, patch: serde_json::Value) -> Result<(), ClusterError> {
        let path = format!("/api/v1/persistentvolumes/{}", path_segment(name));
        let (status, _) = self
            .send(
                Method::PATCH,
                &path,
                Some((MERGE_PATCH, patch.to_string().into_bytes())),
            )
            .await?;
        match status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(ClusterError::Api(format!("PATCH {path}: HTTP {s}"))),
        }
    }

    /// Marks PV `name` lost, saying why.
    pub(crate) async fn annotate_lost(&self, name: &str, reason: &str) -> Result<(), ClusterError> {
        self.patch_pv(
            name,
            serde_json::json!({"metadata": {"annotations": {LOST_ANNOTATION: reason}}}),
        )
        .await
    }

    /// Deletes PV `name` if it is still the object `uid` names (a PV deleted and made again
    /// under the same name meanwhile is not touched: HTTP 409); one already gone counts as
    /// deleted.
    pub(crate) async fn delete_pv(&self, name: &str, uid: &str) -> Result<(), ClusterError> {
        let path = format!("/api/v1/persistentvolumes/{}", path_segment(name));
        let options = if uid.is_empty() {
            serde_json::json!({"apiVersion": "v1", "kind": "DeleteOptions"})
        } else {
            serde_json::json!({"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}})
        };
        let (status, _) = self
            .send(
                Method::DELETE,
                &path,
                Some((JSON, options.to_string().into_bytes())),
            )
            .await?;
        match status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(ClusterError::Api(format!("DELETE {path}: HTTP {s}"))),
        }
    }

    /// Removes the lost mark of PV `name`.
    pub(crate) async fn clear_lost(&self, name: &str) -> Result<(), ClusterError> {
        self.patch_pv(
            name,
            serde_json::json!({"metadata": {"annotations": {LOST_ANNOTATION: null}}}),
        )
        .await
    }

    /// Removes every finalizer of PV `name`: the provisioner that would have removed its own
    /// went with the node.
    pub(crate) async fn drop_finalizers(&self, name: &str) -> Result<(), ClusterError> {
        self.patch_pv(name, serde_json::json!({"metadata": {"finalizers": null}}))
            .await
    }

    fn lease_path(namespace: &str, name: Option<&str>) -> String {
        let base = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
            path_segment(namespace)
        );
        match name {
            Some(n) => format!("{base}/{}", path_segment(n)),
            None => base,
        }
    }

    pub(crate) async fn lease(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Lease>, ClusterError> {
        self.get_json(&Self::lease_path(namespace, Some(name)))
            .await
    }

    /// Creates `lease`, or replaces it when it carries the resourceVersion it was read at;
    /// Conflict when another writer came first.
    pub(crate) async fn write_lease(
        &self,
        namespace: &str,
        lease: &Lease,
    ) -> Result<(), ClusterError> {
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        let (method, path) = match lease.metadata.resource_version {
            Some(_) => (Method::PUT, Self::lease_path(namespace, Some(name))),
            None => (Method::POST, Self::lease_path(namespace, None)),
        };
        let body = serde_json::to_vec(lease)
            .map_err(|e| ClusterError::Api(format!("encoding lease {name}: {e}")))?;
        let (status, _) = self.send(method.clone(), &path, Some((JSON, body))).await?;
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::CONFLICT => {
                Err(ClusterError::Conflict(format!("lease {namespace}/{name}")))
            }
            s => Err(ClusterError::Api(format!("{method} {path}: HTTP {s}"))),
        }
    }

    /// A Warning event on a claim.
    pub(crate) async fn warn_claim(
        &self,
        claim: &ClaimRef,
        reason: &str,
        message: &str,
    ) -> Result<(), ClusterError> {
        self.api
            .event(
                "PersistentVolumeClaim",
                &claim.namespace,
                &claim.name,
                &claim.uid,
                "Warning",
                reason,
                message,
            )
            .await
            .map_err(|e| {
                ClusterError::Api(format!(
                    "event on claim {}/{}: {e}",
                    claim.namespace, claim.name
                ))
            })
    }
}

/// The claim a PV is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimRef {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) uid: String,
}

/// What the cleanup and the node's check need of one PV of this driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DriverPv {
    pub(crate) name: String,
    pub(crate) uid: String,
    pub(crate) volume_id: String,
    /// The node its affinity pins it to (`topology.sealvol.io/node`).
    pub(crate) node: Option<String>,
    pub(crate) phase: String,
    pub(crate) claim: Option<ClaimRef>,
    /// The `sealvol.io/lost` annotation's value.
    pub(crate) lost: Option<String>,
    pub(crate) deleting: bool,
}

impl DriverPv {
    /// The PV as this driver's, or None when another driver (or none) serves it.
    pub(crate) fn of(pv: &PersistentVolume, driver: &str) -> Option<DriverPv> {
        let spec = pv.spec.as_ref()?;
        let csi = spec.csi.as_ref().filter(|c| c.driver == driver)?;
        let node = spec
            .node_affinity
            .as_ref()
            .and_then(|a| a.required.as_ref())
            .and_then(|r| {
                r.node_selector_terms
                    .iter()
                    .flat_map(|t| t.match_expressions.iter().flatten())
                    .find(|e| e.key == TOPOLOGY_KEY && e.operator == "In")
                    .and_then(|e| e.values.as_ref())
                    .and_then(|v| v.first().cloned())
            });
        let claim = spec.claim_ref.as_ref().and_then(|c| {
            Some(ClaimRef {
                namespace: c.namespace.clone()?,
                name: c.name.clone()?,
                uid: c.uid.clone().unwrap_or_default(),
            })
        });
        Some(DriverPv {
            name: pv.metadata.name.clone()?,
            uid: pv.metadata.uid.clone().unwrap_or_default(),
            volume_id: csi.volume_handle.clone(),
            node,
            phase: pv
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default(),
            claim,
            lost: pv
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LOST_ANNOTATION).cloned()),
            deleting: pv.metadata.deletion_timestamp.is_some(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A PV as external-provisioner makes one for this driver.
    pub(crate) fn pv(name: &str, driver: &str, node: &str, phase: &str) -> PersistentVolume {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "csi": {"driver": driver, "volumeHandle": format!("sv-{name}")},
                "claimRef": {"namespace": "ns", "name": format!("claim-{name}"), "uid": "u-1"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": TOPOLOGY_KEY, "operator": "In", "values": [node]}
                ]}]}}
            },
            "status": {"phase": phase}
        }))
        .expect("a PV")
    }

    #[test]
    fn reads_a_pv_of_this_driver() {
        let p = DriverPv::of(&pv("a", "sealvol.csi.io", "n1", "Bound"), "sealvol.csi.io")
            .expect("ours");
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.volume_id, "sv-a");
        assert_eq!(p.phase, "Bound");
        assert_eq!(
            p.claim,
            Some(ClaimRef {
                namespace: "ns".into(),
                name: "claim-a".into(),
                uid: "u-1".into()
            })
        );
        assert_eq!(p.lost, None);
        assert!(!p.deleting);
        assert!(DriverPv::of(&pv("a", "other.csi.io", "n1", "Bound"), "sealvol.csi.io").is_none());
        let mut no_affinity = pv("b", "sealvol.csi.io", "n1", "Bound");
        if let Some(s) = no_affinity.spec.as_mut() {
            s.node_affinity = None;
        }
        assert_eq!(
            DriverPv::of(&no_affinity, "sealvol.csi.io").and_then(|p| p.node),
            None
        );
    }
}
