//! `sealvol node`: set up the pools, recover from whatever a previous run left, then serve
//! CSI until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use crate::csi::{self, PluginInfo, ServeError};
use crate::pool::{PoolError, PoolSpec, Pools};
use crate::sys::{SysError, Tools};
use crate::volume::{Manager, NodeSettings, VolumeError};

/// Everything `sealvol node` needs, as parsed from its flags.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub endpoint: String,
    pub node_id: String,
    /// `NAME=DIR` or `NAME=device:/dev/X[,/dev/Y]`, in order; the first is the default pool.
    pub pools: Vec<String>,
    pub state_dir: PathBuf,
    pub kubelet_dir: PathBuf,
    pub driver_name: String,
    pub max_volumes: i64,
    pub take_over_disks: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--node-id is required and must not be empty")]
    NodeId,
    #[error("--driver-name {0:?}: must be a domain name of at most 63 characters")]
    DriverName(String),
    #[error("{flag} {path}: {source}")]
    Dir {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Tools(#[from] SysError),
    #[error("recovery: {0}")]
    Recovery(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl From<VolumeError> for StartError {
    fn from(e: VolumeError) -> Self {
        StartError::Recovery(e.to_string())
    }
}

fn valid_driver_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// Runs the node plugin until `shutdown` resolves.
pub async fn run_node(
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), StartError> {
    if cfg.node_id.trim().is_empty() {
        return Err(StartError::NodeId);
    }
    if !valid_driver_name(&cfg.driver_name) {
        return Err(StartError::DriverName(cfg.driver_name));
    }
    let tools = Tools::locate()?;
    let online_expansion = crate::sys::can_resize_online();
    let specs = cfg
        .pools
        .iter()
        .map(|s| s.parse::<PoolSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    let dir = |flag: &'static str, path: &PathBuf| -> Result<PathBuf, StartError> {
        let err = |source| StartError::Dir {
            flag,
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path).map_err(err)?;
        path.canonicalize().map_err(err)
    };
    let state_dir = dir("--state-dir", &cfg.state_dir)?;
    let kubelet_dir = dir("--kubelet-dir", &cfg.kubelet_dir)?;
    let pools = tokio::task::block_in_place(|| {
        Pools::open(&specs, &state_dir, &tools, cfg.take_over_disks)
    })?;
    let manager = Arc::new(Manager::new(
        NodeSettings {
            node_id: cfg.node_id.clone(),
            state_dir,
            kubelet_dir,
            online_expansion,
        },
        pools,
        tools,
    ));
    let report = tokio::task::block_in_place(|| manager.recover())?;
    if !online_expansion {
        tracing::warn!(
            "CAP_SYS_RESOURCE is missing: ext4 cannot grow while mounted, so volumes expand offline (advertised as OFFLINE expansion)"
        );
    }
    tracing::info!(?report, "recovery done");
    csi::serve(
        manager,
        PluginInfo {
            driver_name: cfg.driver_name,
            max_volumes: cfg.max_volumes,
            online_expansion,
        },
        &cfg.endpoint,
        shutdown,
    )
    .await?;
    Ok(())
}
