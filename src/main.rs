//! The `sealvol` binary: `node` runs the CSI plugin, `cleanup` the controller that releases
//! the PVs no node can serve, `bench` measures the plugin, `demo` walks one volume through its
//! life. This is the only place that uses anyhow.

mod bench;
mod demo;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

/// Every heap block is cleared before it is freed or moved: buffers that carried key material
/// through HTTP, TLS and JSON leave no copy behind.
#[global_allocator]
static ALLOCATOR: sealvol::ZeroOnFree = sealvol::ZeroOnFree;

#[derive(Parser)]
#[command(
    name = "sealvol",
    version,
    about = "Identity-gated, encrypted, ephemeral local storage for Kubernetes",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SEALVOL_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. info or sealvol=debug.
    #[arg(long, global = true, default_value = "info", env = "SEALVOL_LOG")]
    log_level: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services on a unix socket.
    Node(Box<NodeArgs>),
    /// Release the PersistentVolumes no node can serve any more (node gone, or its pool wiped):
    /// one leader-elected replica per cluster.
    Cleanup(CleanupArgs),
    /// Benchmark full volume lifecycles against a node plugin on a temporary loop-file pool.
    Bench(bench::BenchArgs),
    /// Walk one volume through create, stage, publish, write, unpublish, unstage and delete.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args)]
struct CleanupArgs {
    /// The CSIDriver name: only PVs of this driver are touched.
    #[arg(long, default_value = "sealvol.csi.io")]
    driver_name: String,
    /// How often nodes and PVs are listed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    interval: std::time::Duration,
    /// How long a node must be missing before the PVs pinned to it are released.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    node_gone_grace: std::time::Duration,
    /// The namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: String,
    #[arg(long, default_value = "sealvol-cleanup")]
    lease_name: String,
    /// How long a holder's lease lasts without renewal (renewed every 5 s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: std::time::Duration,
    /// This replica's name as lease holder.
    #[arg(long, env = "POD_NAME")]
    identity: String,
    #[command(flatten)]
    kube: KubeApiArgs,
}

/// Where the Kubernetes API is, when not in-cluster (tests, and running outside a pod).
#[derive(clap::Args)]
struct KubeApiArgs {
    /// The API server (default: in-cluster, from KUBERNETES_SERVICE_HOST and the pod's
    /// ServiceAccount).
    #[arg(long)]
    kube_api_url: Option<String>,
    /// The bearer token file (default: the pod's ServiceAccount token).
    #[arg(long)]
    kube_token_file: Option<PathBuf>,
    /// The API server's CA bundle (default: the pod's ServiceAccount CA).
    #[arg(long)]
    kube_ca_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// CSI endpoint: unix:///path/to/csi.sock
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name (the topology value volumes are pinned to).
    #[arg(long, env = "NODE_NAME")]
    node_id: String,
    /// A pool: NAME=DIR, or NAME=device:/dev/X[,/dev/Y]. Repeatable; the first is the default.
    #[arg(long = "pool", required = true)]
    pools: Vec<String>,
    #[arg(long, default_value = "/var/lib/sealvol")]
    state_dir: PathBuf,
    /// Target and staging paths outside this directory are refused.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    #[arg(long, default_value = "sealvol.csi.io")]
    driver_name: String,
    /// Reported to the scheduler in NodeGetInfo (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,
    /// Format pool disks that carry an unknown filesystem or partition table.
    #[arg(long)]
    take_over_disks: bool,
    /// Audience of the service-account token kubelet passes (CSIDriver tokenRequests).
    #[arg(long, default_value = "api://AzureADTokenExchange")]
    token_audience: String,
    /// Entra ID authority host.
    #[arg(long, default_value = "https://login.microsoftonline.com")]
    authority_host: String,
    /// Extra trust root (PEM) for Entra ID and Key Vault.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Tenant for volumes whose parameters name none (usually AZURE_TENANT_ID).
    #[arg(long, env = "AZURE_TENANT_ID")]
    tenant_id: Option<String>,
    /// Require Key Vault's auth challenge to name a vault.azure.net resource (turn off only
    /// against an emulator).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    keyvault_verify_challenge: bool,
    /// Re-authorize a published volume with Key Vault on the republish after this long
    /// (e.g. 5m, 30s, 0 for every republish).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    reauthorize_interval: std::time::Duration,
    /// Lock a volume whose re-authorization keeps failing for a transient reason only after
    /// this long (0: at once).
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    revoke_grace: std::time::Duration,
    /// Read client and tenant ids from ServiceAccount annotations (needs `get` on
    /// serviceaccounts) when a volume's parameters name none.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    service_account_lookup: bool,
    /// The Kubernetes API (ServiceAccounts, events, evictions, this node's PVs).
    #[command(flatten)]
    kube: KubeApiArgs,
    /// Serve Prometheus metrics (/metrics) and /healthz on this address, e.g. 0.0.0.0:9808.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// Key modes volumes may use on this node, comma-separated; `none` (no encryption, no
    /// identity) only when named here.
    #[arg(long, default_value = "keyvault-key,keyvault-secret")]
    allowed_key_modes: String,
    /// Vault hosts volumes may name, comma-separated: a host, a suffix matched on a label
    /// boundary (.vault.azure.net), or an IP literal, each with an optional :port (else 443
    /// only). Default: Key Vault and Managed HSM in Azure's public and sovereign clouds.
    #[arg(long, default_value_t = sealvol::default_vault_hosts())]
    allowed_vault_hosts: String,
    /// Pools inline volumes may use, comma-separated (default: the default pool only).
    #[arg(long, value_delimiter = ',')]
    inline_pools: Vec<String>,
    /// The largest inline volume a pod may ask for (e.g. 10Gi).
    #[arg(long, default_value = "10Gi")]
    inline_max_size: String,
    /// How long an inline volume whose first publish was refused is kept (keyless, counted
    /// in the pool) so kubelet's retries find it, before it is removed (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    refused_inline_ttl: std::time::Duration,
    /// Where plaintext keys live: `locked` (mlock'd memory) or `secret` (memfd_secret, which
    /// not even the kernel maps; Linux 5.14+ with secretmem enabled).
    #[arg(long, value_enum, default_value_t = KeyMemoryArg::Locked)]
    key_memory: KeyMemoryArg,
    /// The longest a snapshot keeps a staged volume's filesystem frozen (its writers wait
    /// meanwhile); a copy that would take longer is abandoned and the volume thawed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    snapshot_freeze_limit: std::time::Duration,
    /// Blob containers snapshots may be backed up to (a VolumeSnapshotClass's backupURL),
    /// comma-separated: https://ACCOUNT.blob.core.windows.net/CONTAINER. None: no backups.
    #[arg(long, value_delimiter = ',')]
    backup_url: Vec<String>,
    /// The driver's own identity for the backup containers (the workload identity webhook
    /// sets AZURE_CLIENT_ID); its tenant is --tenant-id.
    #[arg(long, env = "AZURE_CLIENT_ID")]
    backup_client_id: Option<String>,
    /// The driver's projected ServiceAccount token, exchanged at Entra ID for Storage tokens.
    #[arg(
        long,
        env = "AZURE_FEDERATED_TOKEN_FILE",
        default_value = "/var/run/secrets/azure/tokens/azure-identity-token"
    )]
    backup_token_file: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyMemoryArg {
    Locked,
    Secret,
}

/// "250ms", "30s", "5m", "1h", or a plain number of seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (250ms, 30s, 5m, 1h)"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(std::time::Duration::from_millis(ms))
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log-level {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: kubectl logs and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, logging `what` happens next.
async fn shutdown_signal(what: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGKILL; serve on.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: {what}");
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Node(a) => {
            let a = *a;
            init_logging(cli.log_format, &cli.log_level)?;
            let cfg = sealvol::NodeConfig {
                endpoint: a.endpoint,
                node_id: a.node_id,
                pools: a.pools,
                state_dir: a.state_dir,
                kubelet_dir: a.kubelet_dir,
                driver_name: a.driver_name,
                max_volumes: a.max_volumes,
                take_over_disks: a.take_over_disks,
                token_audience: a.token_audience,
                authority_host: a.authority_host,
                ca_file: a.ca_file,
                tenant_id: a.tenant_id.clone(),
                keyvault_verify_challenge: a.keyvault_verify_challenge,
                reauthorize_interval: a.reauthorize_interval,
                revoke_grace: a.revoke_grace,
                kube_api_url: a.kube.kube_api_url,
                snapshot_freeze_limit: a.snapshot_freeze_limit,
                kube_token_file: a.kube.kube_token_file,
                kube_ca_file: a.kube.kube_ca_file,
                service_account_lookup: a.service_account_lookup,
                metrics_address: a.metrics_address,
                allowed_key_modes: a.allowed_key_modes,
                allowed_vault_hosts: a.allowed_vault_hosts,
                inline_pools: a.inline_pools,
                inline_max_size: a.inline_max_size,
                refused_inline_ttl: a.refused_inline_ttl,
                key_memory: match a.key_memory {
                    KeyMemoryArg::Locked => sealvol::KeyMemory::Locked,
                    KeyMemoryArg::Secret => sealvol::KeyMemory::Secret,
                },
                backup: sealvol::BackupConfig {
                    urls: a.backup_url,
                    client_id: a.backup_client_id,
                    tenant_id: a.tenant_id,
                    token_file: a.backup_token_file,
                },
            };
            runtime.block_on(sealvol::run_node(
                cfg,
                shutdown_signal("mounted volumes stay mounted"),
            ))?;
            Ok(())
        }
        Command::Cleanup(a) => {
            init_logging(cli.log_format, &cli.log_level)?;
            if a.interval.is_zero() {
                anyhow::bail!("--interval must be more than 0");
            }
            if a.lease_duration < std::time::Duration::from_secs(1) {
                anyhow::bail!("--lease-duration must be at least 1s");
            }
            let cfg = sealvol::CleanupConfig {
                driver_name: a.driver_name,
                interval: a.interval,
                node_gone_grace: a.node_gone_grace,
                lease_namespace: a.lease_namespace,
                lease_name: a.lease_name,
                lease_duration: a.lease_duration,
                identity: a.identity,
                kube_api_url: a.kube.kube_api_url,
                kube_token_file: a.kube.kube_token_file,
                kube_ca_file: a.kube.kube_ca_file,
            };
            runtime.block_on(sealvol::run_cleanup(
                cfg,
                shutdown_signal("giving the lease up"),
            ))?;
            Ok(())
        }
        Command::Bench(a) => runtime.block_on(bench::run(a)),
        Command::Demo(a) => runtime.block_on(demo::run(a)),
    }
}
