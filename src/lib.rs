//! sealvol: a Kubernetes CSI driver for identity-gated, encrypted, ephemeral local storage.
//!
//! Layers, top to bottom (see DESIGN.md): `csi/` adapts gRPC to the domain, `volume/` runs
//! the lifecycle, `pool/` and `crypt/` do the carving and the data path, `sys/` wraps the
//! kernel. The binary (`src/main.rs`) adds the command line, the benchmark and the demo.

mod backup;
mod cluster;
mod crypt;
mod csi;
mod error_text;
mod identity;
mod keys;
mod metrics;
mod node;
mod pool;
mod sys;
mod volume;

pub mod client;
pub mod harness;
pub mod proto;

pub use backup::BackupConfig;
pub use cluster::{CleanupConfig, ClusterError, run_cleanup};
pub use node::{NodeConfig, StartError, run_node};
/// The allocator the binary installs: the system's, clearing every block it frees or moves.
pub use sys::{KeyMemory, ZeroOnFree};

/// The default of `--allowed-vault-hosts`.
pub fn default_vault_hosts() -> String {
    volume::default_vault_hosts()
}
