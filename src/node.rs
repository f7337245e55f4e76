//! `sealvol node`: set up the pools, recover from whatever a previous run left, then serve
//! CSI until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};

use crate::csi::{self, PluginInfo, ServeError};
use crate::identity::{Entra, KubeApi};
use crate::keys::KeyVault;
use crate::pool::{PoolError, PoolSpec, Pools};
use crate::sys::{SysError, Tools};
use crate::volume::{
    KeyRelease, Manager, NodePolicy, NodeSettings, VolumeError, loop_owner, parse_host_rules,
    parse_key_modes,
};

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
    /// The audience of the service-account token kubelet passes (CSIDriver tokenRequests).
    pub token_audience: String,
    /// Entra ID's authority host (the public cloud by default).
    pub authority_host: String,
    /// An extra PEM trust root for Entra ID and Key Vault (the emulator's CA in tests).
    pub ca_file: Option<PathBuf>,
    /// The tenant used when a volume names none.
    pub tenant_id: Option<String>,
    /// Check that Key Vault's auth challenge names a *.vault.azure.net (or HSM) resource;
    /// off only against an emulator.
    pub keyvault_verify_challenge: bool,
    /// A republish re-authorizes with Key Vault when the publication's last authorization is
    /// older than this (zero: every republish).
    pub reauthorize_interval: Duration,
    /// Transient re-authorization failures lock the volume only after lasting this long.
    pub revoke_grace: Duration,
    /// The Kubernetes API for ServiceAccount annotations: None uses the in-cluster one when
    /// there is one; `service_account_lookup` false turns the lookup off.
    pub kube_api_url: Option<String>,
    /// The longest a snapshot may keep a volume's filesystem frozen before it gives up.
    pub snapshot_freeze_limit: Duration,
    pub kube_token_file: Option<PathBuf>,
    pub kube_ca_file: Option<PathBuf>,
    pub service_account_lookup: bool,
    /// Serve /metrics and /healthz here (port 0: any; the address is logged).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The node policy: key modes, vault hosts, and inline volumes' pools and largest size.
    pub allowed_key_modes: String,
    pub allowed_vault_hosts: String,
    pub inline_pools: Vec<String>,
    pub inline_max_size: String,
    /// How long a refused inline volume is kept, keyless, for kubelet's retries before it is
    /// removed (kubelet never unpublishes a volume whose first publish failed).
    pub refused_inline_ttl: Duration,
    /// Which memory holds plaintext keys.
    pub key_memory: crate::sys::KeyMemory,
    /// Snapshot backups to Azure Blob storage: the containers and the driver's own identity.
    pub backup: crate::backup::BackupConfig,
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
    #[error("--ca-file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("HTTP client: {0}")]
    Http(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("{0}")]
    Policy(String),
    #[error("snapshot backups: {0}")]
    Backup(String),
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

/// HTTP options for Entra ID and Key Vault: the system's trust roots plus `ca_file`, bounded
/// retries (429 and 5xx are retried with backoff for a few seconds, well within a CSI call's
/// deadline, then the call fails UNAVAILABLE and kubelet retries it).
fn azure_client_options(
    ca_file: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<ClientOptions, StartError> {
    // No gzip: blob bytes are checked against digests as they arrive, never transformed.
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .no_gzip()
        .no_deflate();
    if let Some(path) = ca_file {
        builder = builder.tls_certs_merge(read_ca(path)?);
    }
    let http = builder
        .build()
        .map_err(|e| StartError::Http(e.to_string()))?;
    Ok(ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_retries: 3,
            max_total_elapsed: azure_core::time::Duration::seconds(8),
            max_delay: azure_core::time::Duration::seconds(2),
        }),
        ..ClientOptions::default()
    })
}

/// The HTTPS client for Key Vault: the same trust roots as Entra's, and no idle connections,
/// so that no pooled connection's buffers keep a copy of the key material a request carried.
fn key_vault_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, StartError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(0);
    if let Some(path) = ca_file {
        builder = builder.tls_certs_merge(read_ca(path)?);
    }
    builder.build().map_err(|e| StartError::Http(e.to_string()))
}

fn read_ca(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, StartError> {
    let err = |reason: String| StartError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))
}

fn node_policy(cfg: &NodeConfig) -> Result<NodePolicy, StartError> {
    let inline_max_bytes = crate::volume::parse_size(&cfg.inline_max_size)
        .map_err(|e| StartError::Policy(format!("--inline-max-size: {e}")))?;
    Ok(NodePolicy {
        allowed_key_modes: parse_key_modes(&cfg.allowed_key_modes).map_err(StartError::Policy)?,
        allowed_vault_hosts: parse_host_rules(&cfg.allowed_vault_hosts)
            .map_err(StartError::Policy)?,
        inline_pools: cfg.inline_pools.clone(),
        inline_max_bytes,
    })
}

fn kube_api(cfg: &NodeConfig) -> Result<Option<Arc<KubeApi>>, StartError> {
    if !cfg.service_account_lookup {
        return Ok(None);
    }
    let api = match &cfg.kube_api_url {
        Some(url) => {
            let token = cfg.kube_token_file.clone().unwrap_or_else(|| {
                PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
            });
            Some(KubeApi::new(url, token, cfg.kube_ca_file.clone()).map_err(StartError::Http)?)
        }
        None => KubeApi::in_cluster().map_err(StartError::Http)?,
    }
    .map(Arc::new);
    match &api {
        Some(_) => tracing::info!("client ids may come from ServiceAccount annotations"),
        None => tracing::info!("not in a cluster: client ids come from volume parameters only"),
    }
    Ok(api)
}

/// In the background, once: marks lost the PVs that place a volume on this node which its
/// pools do not hold (a wiped disk). Retried, backing off to every 5 minutes, while the API
/// does not answer; the node serves meanwhile.
fn spawn_lost_volume_check(manager: Arc<Manager>, driver: String) {
    const MAX_WAIT: Duration = Duration::from_secs(300);
    let Some(api) = manager.kube_api() else {
        tracing::info!("no Kubernetes API client: PVs whose volumes this node lost are not marked");
        return;
    };
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(2);
        loop {
            let node = manager.node_id().to_string();
            let evidence = {
                let manager = Arc::clone(&manager);
                tokio::task::spawn_blocking(move || manager.pool_evidence()).await
            };
            let Ok(evidence) = evidence else {
                return;
            };
            let result = crate::cluster::mark_lost_volumes(
                &api,
                &driver,
                &node,
                |id| manager.holds_volume(id),
                &evidence,
            )
            .await;
            match result {
                Ok(missing) => {
                    tracing::info!(
                        missing = missing.len(),
                        "checked this node's PVs against its pools"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "could not check this node's PVs against its pools");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_WAIT);
                }
            }
        }
    });
}

/// `/metrics` (OpenMetrics text) and `/healthz` (what Probe says) on `addr`, in the background.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    manager: Arc<Manager>,
) -> Result<(), StartError> {
    use axum::http::{StatusCode, header};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Http(format!("--metrics-address {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| StartError::Http(e.to_string()))?;
    let for_metrics = Arc::clone(&manager);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let manager = Arc::clone(&for_metrics);
                async move {
                    if let Ok(Err(e)) =
                        tokio::task::spawn_blocking(move || manager.refresh_gauges()).await
                    {
                        tracing::warn!(error = %e, "metrics: volume and pool gauges not refreshed");
                    }
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        crate::metrics::metrics().encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let manager = Arc::clone(&manager);
                async move {
                    match tokio::task::spawn_blocking(move || manager.probe()).await {
                        Ok(Ok(())) => (StatusCode::OK, "ok".to_string()),
                        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                    }
                }
            }),
        );
    tracing::info!(address = %bound, "metrics listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Removes expired refused inline volumes, checking a few times per TTL (at most every 30 s,
/// at least every second).
fn spawn_refused_inline_sweeper(manager: Arc<Manager>, ttl: Duration) {
    let period = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let m = Arc::clone(&manager);
            match tokio::task::spawn_blocking(move || m.remove_expired_refused_inline()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "removing expired refused inline volumes failed; trying again later")
                }
                Err(e) => tracing::error!(error = %e, "the refused inline volume sweeper panicked"),
            }
        }
    });
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
    // No core dumps, no ptrace by others: keys pass through this process's memory.
    crate::sys::forbid_core_dumps()?;
    // Mount checks rely on statx's STATX_ATTR_MOUNT_ROOT (Linux 5.8+): refuse to start
    // without it rather than misjudge what is mounted.
    crate::sys::mount_root_at(std::path::Path::new("/"))?;
    let key_memory = crate::sys::init_key_memory(cfg.key_memory)?;
    tracing::info!(?key_memory, "key arena mapped and locked");
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
    let policy = node_policy(&cfg)?;
    let state_dir = dir("--state-dir", &cfg.state_dir)?;
    let kubelet_dir = dir("--kubelet-dir", &cfg.kubelet_dir)?;
    let loop_owner = loop_owner(&state_dir)?;
    let pools = tokio::task::block_in_place(|| {
        Pools::open(&specs, &state_dir, &tools, cfg.take_over_disks)
    })?;
    let azure = azure_client_options(cfg.ca_file.as_deref(), Duration::from_secs(15))?;
    // A block of a backup is up to a few MiB: give it longer than a Key Vault call.
    let backups = crate::backup::BackupStore::new(
        &cfg.backup,
        azure_client_options(cfg.ca_file.as_deref(), Duration::from_secs(120))?,
        &cfg.authority_host,
    )
    .map_err(StartError::Backup)?;
    if let Some(b) = &backups {
        tracing::info!(containers = ?b.urls(), "snapshot backups enabled");
    }
    let key_vault_http = key_vault_client(cfg.ca_file.as_deref())?;
    let release = KeyRelease {
        entra: Entra::new(&cfg.authority_host, azure.clone()),
        vault: KeyVault::new(key_vault_http, cfg.keyvault_verify_challenge),
        default_tenant: cfg.tenant_id.clone(),
        kube: kube_api(&cfg)?,
        runtime: tokio::runtime::Handle::current(),
    };
    let manager = Arc::new(Manager::new(
        NodeSettings {
            node_id: cfg.node_id.clone(),
            state_dir,
            kubelet_dir,
            online_expansion,
            token_audience: cfg.token_audience.clone(),
            reauthorize_interval: cfg.reauthorize_interval,
            revoke_grace: cfg.revoke_grace,
            policy,
            loop_owner,
            refused_inline_ttl: cfg.refused_inline_ttl,
            snapshot_freeze_limit: cfg.snapshot_freeze_limit,
        },
        pools,
        tools,
        release,
        backups,
    ));
    let report = tokio::task::block_in_place(|| manager.recover())?;
    if !online_expansion {
        tracing::warn!(
            "CAP_SYS_RESOURCE is missing: ext4 cannot grow while mounted, so volumes expand offline (advertised as OFFLINE expansion)"
        );
    }
    tracing::info!(?report, "recovery done");
    let resumed = tokio::task::block_in_place(|| manager.resume_uploads());
    if resumed > 0 {
        tracing::info!(
            resumed,
            "resuming snapshot backups a previous run left unfinished"
        );
    }
    spawn_refused_inline_sweeper(Arc::clone(&manager), cfg.refused_inline_ttl);
    spawn_lost_volume_check(Arc::clone(&manager), cfg.driver_name.clone());
    if let Some(addr) = cfg.metrics_address {
        serve_metrics(addr, Arc::clone(&manager)).await?;
    }
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
