//! The HTTPS server: one listener on 127.0.0.1 serving Entra ID, the fake Kubernetes issuers,
//! Key Vault and (with `admin`) the control plane. Every request passes one middleware that
//! names its route, applies injected faults, counts it by outcome, and logs one line (route,
//! caller, status, latency; never a token or key).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::crypto::SigningKey;
use crate::faults::{Fault, FaultKind};
use crate::state::State;
use crate::{admin, entra, issuer, keyvault, tls};

/// How the emulator is started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub listen: Option<SocketAddr>,
    pub config: Config,
    pub state_file: Option<PathBuf>,
    /// Serve `/_emulator/` (faults, counters, identities, role assignments, tokens).
    pub admin: bool,
    /// A CA to reuse: (certificate PEM, key PEM).
    pub ca: Option<(String, String)>,
}

pub struct Shared {
    pub base_url: String,
    pub state: Mutex<State>,
    /// Signs the access tokens this Entra issues.
    pub token_key: SigningKey,
    pub faults: Mutex<Vec<Fault>>,
    pub counters: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    pub jwks_cache: Mutex<HashMap<String, (Instant, Vec<serde_json::Value>)>>,
    pub http: reqwest::Client,
    pub admin: bool,
    /// Each vault's own listen port: a request's Host header (`127.0.0.1:PORT`) names its vault.
    pub vault_ports: BTreeMap<String, u16>,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The vault whose port the Host header names.
    pub fn vault_for_host(&self, host: &str) -> Option<String> {
        let port: u16 = host.rsplit_once(':')?.1.parse().ok()?;
        self.vault_ports
            .iter()
            .find(|(_, p)| **p == port)
            .map(|(name, _)| name.clone())
    }

    pub fn vault_url(&self, name: &str) -> Option<String> {
        self.vault_ports
            .get(name)
            .map(|port| format!("https://127.0.0.1:{port}"))
    }
}

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT`: the authority host, and the prefix of issuer and vault URLs.
    pub base_url: String,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

impl Emulator {
    /// Binds, builds the state and starts serving on the current tokio runtime.
    pub async fn start(options: Options) -> Result<Emulator, String> {
        let listen = options
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("listen {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let base_url = format!("https://{addr}");
        let tls = tls::build(options.ca)?;
        let ca = reqwest::Certificate::from_pem(tls.ca_cert_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let state = State::new(&options.config, options.state_file)?;
        let mut vault_listeners = Vec::new();
        let mut vault_ports = BTreeMap::new();
        for name in state.vaults.keys() {
            let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("listen for vault {name}: {e}"))?;
            vault_ports.insert(
                name.clone(),
                l.local_addr().map_err(|e| e.to_string())?.port(),
            );
            vault_listeners.push(l);
        }
        let shared = Arc::new(Shared {
            base_url: base_url.clone(),
            state: Mutex::new(state),
            token_key: SigningKey::generate()?,
            faults: Mutex::new(Vec::new()),
            counters: Mutex::new(BTreeMap::new()),
            jwks_cache: Mutex::new(HashMap::new()),
            http,
            admin: options.admin,
            vault_ports,
        });
        let app = router(Arc::clone(&shared));
        let acceptor = TlsAcceptor::from(Arc::clone(&tls.server_config));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for listener in std::iter::once(listener).chain(vault_listeners) {
            tokio::spawn(serve(
                listener,
                acceptor.clone(),
                app.clone(),
                stop_rx.clone(),
            ));
        }
        tracing::info!(%base_url, "Azure emulator listening");
        Ok(Emulator {
            addr,
            base_url,
            ca_cert_pem: tls.ca_cert_pem,
            ca_key_pem: tls.ca_key_pem,
            shared,
            stop: Some(stop_tx),
        })
    }

    /// The URL of vault `name`, as clients are configured with it (`https://127.0.0.1:PORT`).
    pub fn vault_url(&self, name: &str) -> Option<String> {
        self.shared.vault_url(name)
    }

    /// The issuer URL of fake Kubernetes issuer `name`.
    pub fn issuer_url(&self, name: &str) -> String {
        format!("{}/issuers/{name}", self.base_url)
    }

    /// Calls per route and status so far.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.shared
            .counters
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// How many calls `route` has answered with `status` (any status when None).
    pub fn count(&self, route: &str, status: Option<u16>) -> u64 {
        let counters = self.counters();
        let Some(by_status) = counters.get(route) else {
            return 0;
        };
        match status {
            Some(s) => by_status.get(&s.to_string()).copied().unwrap_or(0),
            None => by_status.values().sum(),
        }
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .merge(entra::routes())
        .merge(issuer::routes())
        .merge(keyvault::routes())
        .merge(admin::routes())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&shared),
            observe,
        ))
        .with_state(shared)
}

/// The route a request is for, as faults and counters name it.
pub fn route_label(method: &Method, path: &str) -> String {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let label = match segs.as_slice() {
        ["_emulator", ..] => "admin",
        ["common", "discovery", "instance"] | [_, "discovery", "instance"] => {
            "entra.instance_discovery"
        }
        [_, "oauth2", "v2.0", "token"] => "entra.token",
        [_, "v2.0", ".well-known", "openid-configuration"] => "entra.discovery",
        ["issuers", _, ".well-known", "openid-configuration"] => "issuer.discovery",
        ["issuers", _, "openid", "v1", "jwks"] => "issuer.jwks",
        ["keys", rest @ ..] => match (method.as_str(), rest) {
            ("POST", [_, "create"]) => "keyvault.create_key",
            ("POST", [_, "rotate"]) => "keyvault.rotate_key",
            ("POST", [.., "wrapkey"]) => "keyvault.wrap",
            ("POST", [.., "unwrapkey"]) => "keyvault.unwrap",
            ("POST", [.., "encrypt"]) => "keyvault.encrypt",
            ("POST", [.., "decrypt"]) => "keyvault.decrypt",
            ("GET", _) => "keyvault.get_key",
            ("PATCH", _) => "keyvault.update_key",
            ("DELETE", _) => "keyvault.delete_key",
            _ => "keyvault.other",
        },
        ["secrets", ..] => match method.as_str() {
            "PUT" => "keyvault.set_secret",
            "GET" => "keyvault.get_secret",
            "DELETE" => "keyvault.delete_secret",
            _ => "keyvault.other",
        },
        _ => "unknown",
    };
    label.to_string()
}

/// The caller a handler identified (an object id), for the request log.
#[derive(Clone)]
pub struct Caller(pub String);

async fn observe(AxState(shared): AxState<Arc<Shared>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = route_label(req.method(), req.uri().path());
    let fault = if route == "admin" {
        None
    } else {
        crate::faults::take(&shared.faults, &route)
    };
    let response = match fault {
        Some(FaultKind::Latency { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            next.run(req).await
        }
        Some(FaultKind::Status {
            status,
            retry_after,
        }) => {
            let mut r = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                axum::Json(serde_json::json!({"error": {"code": "Throttled", "message": format!("injected fault: HTTP {status}")}})),
            )
                .into_response();
            if let Some(secs) = retry_after
                && let Ok(v) = HeaderValue::from_str(&secs.to_string())
            {
                r.headers_mut().insert("retry-after", v);
            }
            r
        }
        Some(FaultKind::Drop) => {
            // Headers go out, then the body breaks off: the client sees the connection die.
            let stream = BrokenBody(false);
            Response::builder()
                .status(StatusCode::OK)
                .header("content-length", "1024")
                .body(Body::from_stream(stream))
                .unwrap_or_default()
        }
        None => next.run(req).await,
    };
    let status = response.status().as_u16();
    if route != "admin"
        && let Ok(mut c) = shared.counters.lock()
    {
        *c.entry(route.clone())
            .or_default()
            .entry(status.to_string())
            .or_default() += 1;
    }
    let caller = response
        .extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    tracing::info!(
        route,
        caller,
        status,
        latency_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// A body that fails at once: the response's connection breaks off.
struct BrokenBody(bool);

impl futures_core::Stream for BrokenBody {
    type Item = Result<axum::body::Bytes, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.0 {
            return std::task::Poll::Ready(None);
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Err(std::io::Error::other("injected connection drop"))))
    }
}
