//! `sealvol-azure-emulator serve`: run the emulator; `mint-token`: ask a running one (with
//! `--admin`) for a service-account token from one of its fake issuers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sealvol_azure_emulator::{Config, Emulator, Options, TokenRequest};

#[derive(Parser)]
#[command(
    name = "sealvol-azure-emulator",
    version,
    about = "Entra ID, Key Vault, Managed HSM and Blob storage (through Azurite), emulated for sealvol's tests and demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Entra ID, Key Vault, Managed HSM, the fake Kubernetes issuers and (with storage
    /// accounts) the Blob gateway in front of Azurite over HTTPS.
    Serve {
        /// Address to listen on (port 0 picks one; the bound address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Tenants, identities, issuers, vaults, Managed HSMs, keys, secrets, role assignments
        /// (JSON or YAML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Keep keys, secrets and assignments across restarts in this file.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Write the CA certificate (PEM) that clients must trust here.
        #[arg(long)]
        ca_out: Option<PathBuf>,
        /// Reuse a CA instead of generating one: certificate and key PEM files.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        #[arg(long)]
        ca_key: Option<PathBuf>,
        /// Serve the control plane under /_emulator/ (tests only).
        #[arg(long)]
        admin: bool,
        /// Azurite's azurite-blob binary (`npm install -g azurite@3.37.0`): needed when the
        /// configuration has storage accounts, whose blobs it stores behind the Blob gateway.
        #[arg(long)]
        azurite: Option<PathBuf>,
    },
    /// Print a service-account token minted by a running emulator's fake issuer.
    MintToken {
        /// The emulator's base URL, as `serve` printed it.
        #[arg(long)]
        emulator: String,
        /// The emulator's CA certificate (from --ca-out).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value = "cluster")]
        issuer: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "api://AzureADTokenExchange")]
        audience: String,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMULATOR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve {
            listen,
            config,
            state,
            ca_out,
            ca_cert,
            ca_key,
            admin,
            azurite,
        } => {
            let config = match config {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("--config {}", path.display()))?;
                    Config::parse(&text)
                        .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?
                }
                None => Config::default(),
            };
            let ca = match (ca_cert, ca_key) {
                (Some(c), Some(k)) => Some((
                    std::fs::read_to_string(&c).with_context(|| c.display().to_string())?,
                    std::fs::read_to_string(&k).with_context(|| k.display().to_string())?,
                )),
                _ => None,
            };
            let emulator = Emulator::start(Options {
                listen: Some(listen),
                config,
                state_file: state,
                admin,
                ca,
                azurite,
            })
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
            if let Some(path) = ca_out {
                std::fs::write(&path, &emulator.ca_cert_pem)
                    .with_context(|| format!("--ca-out {}", path.display()))?;
            }
            // First line: the authority host and issuer base; then one line per vault, then one
            // per Managed HSM, then one per storage account (its Blob gateway URL).
            println!("{}", emulator.base_url);
            for (name, _) in emulator.shared.vault_ports.iter() {
                println!(
                    "vault {name} {}",
                    emulator.vault_url(name).unwrap_or_default()
                );
            }
            for (name, _) in emulator.shared.hsm_ports.iter() {
                println!("hsm {name} {}", emulator.hsm_url(name).unwrap_or_default());
            }
            for name in emulator.shared.blob.iter().flat_map(|b| b.accounts.keys()) {
                println!(
                    "blob {name} {}",
                    emulator.blob_url(name).unwrap_or_default()
                );
            }
            std::io::stdout().flush()?;
            // SIGTERM too (what harnesses and `terminate()` send): the emulator is then dropped,
            // which kills Azurite and removes its temporary directory.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            drop(emulator);
            Ok(())
        }
        Command::MintToken {
            emulator,
            ca,
            issuer,
            namespace,
            service_account,
            audience,
            ttl_secs,
        } => {
            let pem = std::fs::read(&ca).with_context(|| format!("--ca {}", ca.display()))?;
            let client = reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(&pem)?])
                .build()?;
            let req = TokenRequest {
                namespace,
                service_account,
                audiences: vec![audience],
                pod_name: None,
                pod_uid: None,
                ttl_secs,
                offset_secs: 0,
            };
            let response = client
                .post(format!(
                    "{}/_emulator/issuers/{issuer}/token",
                    emulator.trim_end_matches('/')
                ))
                .json(&req)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!(
                    "{}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            let body: serde_json::Value = response.json().await?;
            println!("{}", body["token"].as_str().unwrap_or_default());
            Ok(())
        }
    }
}
