//! The workload identity a ServiceAccount names in its annotations
//! (`azure.workload.identity/client-id`, `.../tenant-id`), read through the Kubernetes API with
//! the driver's own in-cluster credentials (RBAC: `get` on serviceaccounts). Answers are cached
//! for a minute per (namespace, name).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::IdentityError;

const CLIENT_ID: &str = "azure.workload.identity/client-id";
const TENANT_ID: &str = "azure.workload.identity/tenant-id";
const TTL: Duration = Duration::from_secs(60);
const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Annotations {
    pub(crate) client_id: Option<String>,
    pub(crate) tenant_id: Option<String>,
}

pub(crate) struct KubeApi {
    base_url: String,
    token_file: PathBuf,
    http: reqwest::Client,
    cache: Mutex<HashMap<(String, String), (Instant, Annotations)>>,
}

impl KubeApi {
    /// The API server as a pod sees it (KUBERNETES_SERVICE_HOST/PORT and the mounted service
    /// account), or None outside a cluster.
    pub(crate) fn in_cluster() -> Result<Option<KubeApi>, String> {
        let (Ok(host), Ok(port)) = (
            std::env::var("KUBERNETES_SERVICE_HOST"),
            std::env::var("KUBERNETES_SERVICE_PORT"),
        ) else {
            return Ok(None);
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = PathBuf::from(IN_CLUSTER_DIR);
        KubeApi::new(
            &format!("https://{host}:{port}"),
            dir.join("token"),
            Some(dir.join("ca.crt")),
        )
        .map(Some)
    }

    pub(crate) fn new(
        base_url: &str,
        token_file: PathBuf,
        ca_file: Option<PathBuf>,
    ) -> Result<KubeApi, String> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(&ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder = builder.tls_certs_only(certs);
        }
        Ok(KubeApi {
            base_url: base_url.trim_end_matches('/').to_string(),
            token_file,
            http: builder.build().map_err(|e| e.to_string())?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// One request to the API at `path` (below the server's URL) with the driver's token,
    /// re-read every time because kubelet rotates it: the status and the body. For callers
    /// that bring their own object types (`crate::cluster`).
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<(reqwest::StatusCode, bytes::Bytes), String> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("{}: {e}", self.token_file.display()))?;
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .bearer_auth(token.trim());
        if let Some((content_type, bytes)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        let resp = request
            .send()
            .await
            .map_err(|e| crate::error_text::with_causes(&e))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| crate::error_text::with_causes(&e))?;
        Ok((status, bytes))
    }

    /// Evicts a pod through the Eviction API (`pods/eviction` create), which honours its
    /// PodDisruptionBudget. A pod already gone is evicted.
    pub(crate) async fn evict(&self, namespace: &str, name: &str) -> Result<(), IdentityError> {
        let unavailable = |e: String| {
            IdentityError::ApiUnavailable(format!("evicting pod {namespace}/{name}: {e}"))
        };
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|e| unavailable(e.to_string()))?;
        let url = format!(
            "{}/api/v1/namespaces/{}/pods/{}/eviction",
            self.base_url,
            path_segment(namespace),
            path_segment(name)
        );
        let body = serde_json::json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        });
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token.trim())
            .json(&body)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        match resp.status().as_u16() {
            200..=299 | 404 => Ok(()),
            s => Err(unavailable(format!("HTTP {s}"))),
        }
    }

    /// Posts an event about an object (`kind` Pod or PersistentVolumeClaim).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn event(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        uid: &str,
        event_type: &str,
        reason: &str,
        message: &str,
    ) -> Result<(), String> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| e.to_string())?;
        let now = azure_core::time::to_rfc3339(&azure_core::time::OffsetDateTime::now_utc());
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{name}.sealvol-"), "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": kind, "name": name, "namespace": namespace, "uid": uid},
            "reason": reason,
            "message": message,
            "type": event_type,
            "source": {"component": "sealvol"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let url = format!(
            "{}/api/v1/namespaces/{}/events",
            self.base_url,
            path_segment(namespace)
        );
        let resp = self
            .http
            .post(url)
            .bearer_auth(token.trim())
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", resp.status()))
        }
    }

    /// The ServiceAccount's workload-identity annotations.
    pub(crate) async fn annotations(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Annotations, IdentityError> {
        let key = (namespace.to_string(), name.to_string());
        if let Some((at, hit)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            && at.elapsed() < TTL
        {
            return Ok(hit.clone());
        }
        let unavailable = |e: String| {
            IdentityError::ApiUnavailable(format!("reading ServiceAccount {namespace}/{name}: {e}"))
        };
        // The token is re-read every time: kubelet rotates it.
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|e| unavailable(e.to_string()))?;
        let url = format!(
            "{}/api/v1/namespaces/{}/serviceaccounts/{}",
            self.base_url,
            path_segment(namespace),
            path_segment(name)
        );
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token.trim())
            .send()
            .await
            .map_err(|e| unavailable(crate::error_text::with_causes(&e)))?;
        let sa: serde_json::Value = if resp.status() == reqwest::StatusCode::NOT_FOUND {
            // No such ServiceAccount (yet): it has no annotations.
            serde_json::Value::Null
        } else if resp.status().is_success() {
            resp.json().await.map_err(|e| unavailable(e.to_string()))?
        } else {
            return Err(unavailable(format!("HTTP {}", resp.status())));
        };
        let get = |k: &str| {
            sa["metadata"]["annotations"][k]
                .as_str()
                .map(str::to_string)
                .filter(|v| !v.is_empty())
        };
        let found = Annotations {
            client_id: get(CLIENT_ID),
            tenant_id: get(TENANT_ID),
        };
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (Instant::now(), found.clone()));
        Ok(found)
    }
}

/// `s` as one URL path segment: every byte but RFC 3986's unreserved ones percent-encoded, so
/// that a name from a request can never add a segment or a query.
pub(crate) fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_one_path_segment() {
        assert_eq!(path_segment("default"), "default");
        assert_eq!(path_segment("../x?y=1"), "..%2Fx%3Fy%3D1");
        assert_eq!(path_segment("a b#"), "a%20b%23");
    }
}
