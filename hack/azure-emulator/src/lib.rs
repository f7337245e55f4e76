//! sealvol-azure-emulator: the parts of Entra ID and Key Vault that sealvol uses, emulated over
//! HTTPS on 127.0.0.1 faithfully enough that Microsoft's own SDKs work against it, plus a fake
//! Kubernetes service-account issuer to play kubelet. Test and demo infrastructure only: the
//! sealvol node plugin never depends on this crate.
//!
//! URLs, all under one base `https://127.0.0.1:PORT`:
//! - Entra ID authority host: the base itself (`/{tenant}/oauth2/v2.0/token`, ...);
//! - fake issuer `NAME`: `/issuers/NAME` (discovery and JWKS below it);
//! - vault `NAME`: its own port, `https://127.0.0.1:VAULTPORT` (chosen by the Host header, so
//!   key and secret ids have the exact shape the SDKs parse);
//! - control plane (with `--admin`): `/_emulator/`.

// Handlers return an early `Response` as the error of small helpers: the idiom of axum code.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod config;
pub mod crypto;
pub mod entra;
pub mod faults;
pub mod issuer;
pub mod keyvault;
pub mod rbac;
pub mod records;
pub mod server;
pub mod state;
pub mod tls;

pub use config::{Config, FederatedCredential, Identity, KeySpec, RoleAssignment};
pub use faults::{FaultKind, FaultSpec};
pub use issuer::TokenRequest;
pub use records::RequestRecord;
pub use server::{Emulator, Options};

impl Emulator {
    /// Mints a service-account token from fake issuer `issuer`, as kubelet receives one.
    pub fn mint_token(&self, issuer: &str, req: &TokenRequest) -> Result<String, String> {
        issuer::mint(&self.shared, issuer, req)
    }

    /// Adds (or replaces) a role assignment; takes effect on the next call.
    pub fn assign_role(&self, ra: RoleAssignment) {
        let mut state = self.shared.lock();
        if !state.role_assignments.contains(&ra) {
            state.role_assignments.push(ra);
        }
    }

    /// Removes a role assignment; takes effect on the next call.
    pub fn revoke_role(&self, ra: &RoleAssignment) -> bool {
        let mut state = self.shared.lock();
        let before = state.role_assignments.len();
        state.role_assignments.retain(|r| r != ra);
        before != state.role_assignments.len()
    }

    pub fn inject_fault(&self, spec: FaultSpec) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f.push(spec.into());
        }
    }

    pub fn clear_faults(&self) {
        if let Ok(mut f) = self.shared.faults.lock() {
            f.clear();
        }
    }
}
