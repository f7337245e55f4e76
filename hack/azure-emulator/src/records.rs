//! Request records: one per Key Vault and Managed HSM request, naming who called (the object
//! id, client id and tenant of a token the service accepted), which vault or HSM, which route
//! and object, and the status it answered. Security tests read them to prove whose token each
//! request carried; they never hold a token or key material.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// At most this many records are kept; the oldest go first.
pub const MAX_RECORDS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// "keyvault" or "managedhsm".
    pub service: String,
    /// The vault's or Managed HSM's name.
    pub vault: String,
    /// The route label, as counters and faults name it (`keyvault.unwrap`, ...).
    pub route: String,
    /// The key or secret name, when the route names one.
    pub object: Option<String>,
    /// The caller's object id; None when no token was accepted (the challenge probe, a
    /// refused token).
    pub object_id: Option<String>,
    /// The caller's client id (the token's `appid`).
    pub client_id: Option<String>,
    /// The caller's tenant (the token's `tid`).
    pub tenant: Option<String>,
    pub status: u16,
}

/// The identity of a token the data plane accepted, attached to its response.
#[derive(Debug, Clone, Default)]
pub struct AuthInfo {
    pub object_id: String,
    pub client_id: String,
    pub tenant: String,
}

#[derive(Default)]
pub struct Records(Mutex<VecDeque<RequestRecord>>);

impl Records {
    pub fn push(&self, r: RequestRecord) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_RECORDS {
            q.pop_front();
        }
        q.push_back(r);
    }

    pub fn all(&self) -> Vec<RequestRecord> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
