//! Injected faults: per route (a label such as `keyvault.unwrap` or `blob.put_block`, a service
//! prefix such as `managedhsm.*`, `entra.*` or `blob.*`, or `*` for every non-admin route), optionally for one identity
//! only (its client id), a latency, an HTTP status (429 with Retry-After, 500, 503, ...), an
//! Entra error with a chosen AADSTS code, or a dropped connection; for a number of requests or
//! for a duration.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    Latency {
        ms: u64,
    },
    /// An HTTP status with the service's own error body (Key Vault's JSON on vault and HSM
    /// routes, Entra's OAuth error on `entra.*` routes, Storage's XML on `blob.*` routes: 503
    /// and 429 ServerBusy, else InternalError).
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Entra's OAuth error body with a chosen status, `error` string and AADSTS code, e.g.
    /// 503 `temporarily_unavailable` 90033, or 400 `invalid_client` 70021. `description` is
    /// the text after "AADSTSnnnnn: " (a stock text per code when None). On `blob.*` routes,
    /// `error` is the Storage error code and `description` its message.
    EntraError {
        status: u16,
        error: String,
        code: u32,
        #[serde(default)]
        description: Option<String>,
    },
    Drop,
}

/// How a fault is asked for on the control plane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultSpec {
    /// A route label (see `route_label`, `blob::target`), a service prefix (`keyvault.*`,
    /// `managedhsm.*`, `entra.*`, `blob.*`), or `*`.
    pub route: String,
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Applies to this many requests (None: no limit).
    pub count: Option<u32>,
    /// Applies for this long (None: no limit).
    pub duration_ms: Option<u64>,
    /// Applies only to requests of this identity (None: everyone): on Entra's token endpoint
    /// the form's `client_id`, on Key Vault, Managed HSM and Blob the `appid` of a valid bearer
    /// token.
    #[serde(default)]
    pub client_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Fault {
    route: String,
    kind: FaultKind,
    remaining: Option<u32>,
    until: Option<Instant>,
    client_id: Option<String>,
}

impl From<FaultSpec> for Fault {
    fn from(s: FaultSpec) -> Self {
        Fault {
            route: s.route,
            kind: s.kind,
            remaining: s.count,
            until: s
                .duration_ms
                .map(|ms| Instant::now() + Duration::from_millis(ms)),
            client_id: s.client_id,
        }
    }
}

impl Fault {
    /// Whether any fault of this kind is limited to one identity (then the caller must be
    /// found out before faults are taken).
    pub fn is_per_identity(&self) -> bool {
        self.client_id.is_some()
    }

    fn matches(&self, route: &str, client_id: Option<&str>) -> bool {
        let route_ok = self.route == "*"
            || self.route == route
            || self
                .route
                .strip_suffix(".*")
                .is_some_and(|prefix| route.split('.').next() == Some(prefix));
        let who_ok = match &self.client_id {
            None => true,
            Some(want) => client_id == Some(want.as_str()),
        };
        route_ok && who_ok
    }
}

/// The fault that applies to this request on `route`, if any, counting it down.
pub fn take(faults: &Mutex<Vec<Fault>>, route: &str) -> Option<FaultKind> {
    take_for(faults, route, None)
}

/// The fault that applies to a request on `route` by `client_id` (None: unknown caller, so
/// only faults for everyone apply), counting it down.
pub fn take_for(
    faults: &Mutex<Vec<Fault>>,
    route: &str,
    client_id: Option<&str>,
) -> Option<FaultKind> {
    let mut faults = faults.lock().ok()?;
    let now = Instant::now();
    faults.retain(|f| f.remaining != Some(0) && f.until.is_none_or(|u| u > now));
    let f = faults.iter_mut().find(|f| f.matches(route, client_id))?;
    if let Some(n) = f.remaining.as_mut() {
        *n -= 1;
    }
    Some(f.kind.clone())
}

/// Whether some fault is limited to one identity.
pub fn any_per_identity(faults: &Mutex<Vec<Fault>>) -> bool {
    faults
        .lock()
        .map(|f| f.iter().any(Fault::is_per_identity))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(route: &str, kind: FaultKind, count: Option<u32>, who: Option<&str>) -> Fault {
        Fault::from(FaultSpec {
            route: route.into(),
            kind,
            count,
            duration_ms: None,
            client_id: who.map(str::to_string),
        })
    }

    #[test]
    fn counted_faults_run_out() {
        let faults = Mutex::new(vec![spec("entra.token", FaultKind::Drop, Some(2), None)]);
        assert_eq!(take(&faults, "keyvault.unwrap"), None);
        assert_eq!(take(&faults, "entra.token"), Some(FaultKind::Drop));
        assert_eq!(take(&faults, "entra.token"), Some(FaultKind::Drop));
        assert_eq!(take(&faults, "entra.token"), None);
    }

    #[test]
    fn service_prefixes_and_identities() {
        let faults = Mutex::new(vec![
            spec("managedhsm.*", FaultKind::Drop, None, Some("app-a")),
            spec("entra.*", FaultKind::Latency { ms: 1 }, None, None),
        ]);
        assert_eq!(take_for(&faults, "managedhsm.unwrap", Some("app-b")), None);
        assert_eq!(take_for(&faults, "managedhsm.unwrap", None), None);
        assert_eq!(
            take_for(&faults, "managedhsm.unwrap", Some("app-a")),
            Some(FaultKind::Drop)
        );
        assert_eq!(take_for(&faults, "keyvault.unwrap", Some("app-a")), None);
        assert_eq!(
            take_for(&faults, "entra.token", Some("anyone")),
            Some(FaultKind::Latency { ms: 1 })
        );
        assert!(any_per_identity(&faults));
    }

    #[test]
    fn specs_parse_without_client_id() {
        let s: FaultSpec = serde_json::from_str(
            r#"{"route": "entra.token", "kind": "entra_error", "status": 503, "error": "temporarily_unavailable", "code": 90033, "count": 1, "duration_ms": null}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.client_id, None);
        assert!(matches!(s.kind, FaultKind::EntraError { code: 90033, .. }));
    }
}
