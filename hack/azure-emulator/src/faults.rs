//! Injected faults: per route (or `*` for every non-admin route), a latency, an HTTP status
//! (429 with Retry-After, 500, 503, ...) or a dropped connection, for a number of requests or
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
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    Drop,
}

/// How a fault is asked for on the control plane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultSpec {
    /// A route label (see `route_label`), or `*`.
    pub route: String,
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Applies to this many requests (None: no limit).
    pub count: Option<u32>,
    /// Applies for this long (None: no limit).
    pub duration_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Fault {
    route: String,
    kind: FaultKind,
    remaining: Option<u32>,
    until: Option<Instant>,
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
        }
    }
}

/// The fault that applies to this request on `route`, if any, counting it down.
pub fn take(faults: &Mutex<Vec<Fault>>, route: &str) -> Option<FaultKind> {
    let mut faults = faults.lock().ok()?;
    let now = Instant::now();
    faults.retain(|f| f.remaining != Some(0) && f.until.is_none_or(|u| u > now));
    let f = faults
        .iter_mut()
        .find(|f| f.route == route || f.route == "*")?;
    if let Some(n) = f.remaining.as_mut() {
        *n -= 1;
    }
    Some(f.kind.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_faults_run_out() {
        let faults = Mutex::new(vec![Fault::from(FaultSpec {
            route: "entra.token".into(),
            kind: FaultKind::Drop,
            count: Some(2),
            duration_ms: None,
        })]);
        assert_eq!(take(&faults, "keyvault.unwrap"), None);
        assert_eq!(take(&faults, "entra.token"), Some(FaultKind::Drop));
        assert_eq!(take(&faults, "entra.token"), Some(FaultKind::Drop));
        assert_eq!(take(&faults, "entra.token"), None);
    }
}
