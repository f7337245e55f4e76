//! The HTTPS server: one listener on 127.0.0.1 serving Entra ID, the fake Kubernetes issuers
//! and (with `admin`) the control plane, plus one listener per vault and per Managed HSM (the
//! port names which), and with storage accounts configured, Azurite as a child process and one
//! listener for the Blob gateway in front of it (`blob`). Every request passes one middleware
//! that names its route, applies injected faults, counts it by outcome, records data-plane
//! requests (who, what, status), and logs one line (route, caller, status, latency; never a
//! token or key); the Blob gateway does the same in its own handler.

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

use crate::azurite::{Azurite, INSTALL_HINT};
use crate::blob::Gateway;
use crate::config::Config;
use crate::crypto::SigningKey;
use crate::faults::{Fault, FaultKind};
use crate::records::{AuthInfo, Records, RequestRecord};
use crate::state::State;
use crate::{admin, blob, entra, issuer, keyvault, tls};

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
    /// Azurite's `azurite-blob` binary (`npm install -g azurite@3.37.0`), started when the
    /// configuration has storage accounts. The binary itself, not a wrapper script: the
    /// emulator kills the process it starts.
    pub azurite: Option<PathBuf>,
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
    /// Each Managed HSM's own listen port, likewise.
    pub hsm_ports: BTreeMap<String, u16>,
    /// Data-plane request records (see `records`).
    pub records: Records,
    /// The Blob gateway, when storage accounts are configured.
    pub blob: Option<Gateway>,
}

/// The two data-plane services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    KeyVault,
    ManagedHsm,
}

impl Service {
    /// The service's name in route labels and request records.
    pub fn label(self) -> &'static str {
        match self {
            Service::KeyVault => "keyvault",
            Service::ManagedHsm => "managedhsm",
        }
    }
}

/// The vault or Managed HSM a request's port names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub service: Service,
    pub name: String,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one answer of `route` with `status`.
    pub fn count(&self, route: &str, status: u16) {
        if let Ok(mut c) = self.counters.lock() {
            *c.entry(route.to_string())
                .or_default()
                .entry(status.to_string())
                .or_default() += 1;
        }
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

    pub fn hsm_url(&self, name: &str) -> Option<String> {
        self.hsm_ports
            .get(name)
            .map(|port| format!("https://127.0.0.1:{port}"))
    }

    /// The vault or Managed HSM whose port the Host header (`127.0.0.1:PORT`) names.
    pub fn endpoint_for_host(&self, host: &str) -> Option<Endpoint> {
        let port: u16 = host.rsplit_once(':')?.1.parse().ok()?;
        let find = |ports: &BTreeMap<String, u16>| {
            ports
                .iter()
                .find(|(_, p)| **p == port)
                .map(|(name, _)| name.clone())
        };
        if let Some(name) = find(&self.vault_ports) {
            return Some(Endpoint {
                service: Service::KeyVault,
                name,
            });
        }
        find(&self.hsm_ports).map(|name| Endpoint {
            service: Service::ManagedHsm,
            name,
        })
    }

    /// The URL of an endpoint, as its ids start.
    pub fn endpoint_url(&self, e: &Endpoint) -> String {
        match e.service {
            Service::KeyVault => self.vault_url(&e.name),
            Service::ManagedHsm => self.hsm_url(&e.name),
        }
        .unwrap_or_default()
    }
}

/// A running emulator. Dropping it stops the server and kills Azurite (and waits for it).
pub struct Emulator {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT`: the authority host, and the prefix of issuer and vault URLs.
    pub base_url: String,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    // Dropped after `drop` has stopped the listeners.
    azurite: Option<Azurite>,
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
            .tls_certs_only([ca.clone()])
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let state = State::new(&options.config, options.state_file)?;
        let accounts = &options.config.storage_accounts;
        let (mut azurite, mut blob_listener, mut blob) = (None, None, None);
        if !accounts.is_empty() {
            for a in accounts {
                a.validate()?;
            }
            let binary = options.azurite.as_ref().ok_or_else(|| {
                format!(
                    "the configuration has storage accounts, which Azurite serves: name its azurite-blob binary (serve --azurite PATH, Options::azurite); install it with `{INSTALL_HINT}`"
                )
            })?;
            let az = Azurite::start(binary, &tls, accounts, &http).await?;
            let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("listen for the Blob gateway: {e}"))?;
            let port = l.local_addr().map_err(|e| e.to_string())?.port();
            let tenant = options.config.tenants.first().map(|t| t.id.clone());
            let tenant = tenant.unwrap_or_default();
            blob = Some(Gateway::new(port, &az, accounts, tenant, ca.clone())?);
            azurite = Some(az);
            blob_listener = Some(l);
        }
        let mut vault_listeners = Vec::new();
        let mut vault_ports = BTreeMap::new();
        let mut hsm_ports = BTreeMap::new();
        let names = state
            .vaults
            .keys()
            .map(|n| (Service::KeyVault, n))
            .chain(state.hsms.keys().map(|n| (Service::ManagedHsm, n)));
        for (service, name) in names {
            let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("listen for {} {name}: {e}", service.label()))?;
            let port = l.local_addr().map_err(|e| e.to_string())?.port();
            match service {
                Service::KeyVault => vault_ports.insert(name.clone(), port),
                Service::ManagedHsm => hsm_ports.insert(name.clone(), port),
            };
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
            hsm_ports,
            records: Records::default(),
            blob,
        });
        if let (Some(az), Some(gw)) = (&azurite, &shared.blob) {
            let token = gw.azurite_token(&shared)?;
            for a in accounts {
                for c in &a.containers {
                    az.create_container(&gw.http, &token, &a.name, c).await?;
                }
            }
        }
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
        if let Some(l) = blob_listener {
            let app = blob::router(Arc::clone(&shared));
            tokio::spawn(serve(l, acceptor.clone(), app, stop_rx.clone()));
        }
        tracing::info!(%base_url, "Azure emulator listening");
        if let Some(gw) = &shared.blob {
            tracing::info!(azurite = %gw.azurite_url, gateway_port = gw.port, "Azurite behind the Blob gateway");
        }
        Ok(Emulator {
            addr,
            base_url,
            ca_cert_pem: tls.ca_cert_pem,
            ca_key_pem: tls.ca_key_pem,
            shared,
            stop: Some(stop_tx),
            azurite,
        })
    }

    /// Azurite's own URL (`https://127.0.0.1:PORT`), behind the gateway: it checks no
    /// signature and no role, so only tests of the gateway itself should call it.
    pub fn azurite_url(&self) -> Option<String> {
        self.azurite.as_ref().map(|a| a.url.clone())
    }

    /// The Blob gateway's URL of storage account `account`, `https://127.0.0.1:PORT/{account}`
    /// (path-style, as Azurite's): a container's URL is this plus `/{container}`.
    pub fn blob_url(&self, account: &str) -> Option<String> {
        self.shared.blob.as_ref()?.account_url(account)
    }

    /// The URL of vault `name`, as clients are configured with it (`https://127.0.0.1:PORT`).
    pub fn vault_url(&self, name: &str) -> Option<String> {
        self.shared.vault_url(name)
    }

    /// The URL of Managed HSM `name` (`https://127.0.0.1:PORT`): its own port, as a vault's.
    pub fn hsm_url(&self, name: &str) -> Option<String> {
        self.shared.hsm_url(name)
    }

    /// Every Key Vault and Managed HSM request recorded so far, oldest first.
    pub fn records(&self) -> Vec<RequestRecord> {
        self.shared.records.all()
    }

    /// Forgets the request records.
    pub fn clear_records(&self) {
        self.shared.records.clear()
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

/// The route a request is for, as faults and counters name it; data-plane paths are labelled
/// as Key Vault's.
pub fn route_label(method: &Method, path: &str) -> String {
    service_route_label(Service::KeyVault, method, path)
}

/// The route a request is for, data-plane paths labelled `{service}.{operation}`.
pub fn service_route_label(service: Service, method: &Method, path: &str) -> String {
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
        [first, ..] if DATA_PLANE_ROOTS.contains(first) => {
            return format!("{}.{}", service.label(), operation(method, &segs));
        }
        _ => "unknown",
    };
    label.to_string()
}

/// The first path segments the data plane serves.
pub const DATA_PLANE_ROOTS: &[&str] = &["keys", "secrets", "deletedkeys", "deletedsecrets"];

/// The data-plane operation of a path (split into segments), as the second half of a label.
fn operation(method: &Method, segs: &[&str]) -> &'static str {
    let m = method.as_str();
    match segs {
        ["keys"] | ["keys", ""] if m == "GET" => "list_keys",
        ["keys", _, "create"] if m == "POST" => "create_key",
        ["keys", _, "rotate"] if m == "POST" => "rotate_key",
        ["keys", _, "versions"] if m == "GET" => "list_key_versions",
        ["keys", _, .., op] if m == "POST" => match *op {
            "wrapkey" => "wrap",
            "unwrapkey" => "unwrap",
            "encrypt" => "encrypt",
            "decrypt" => "decrypt",
            "sign" => "sign",
            "verify" => "verify",
            _ => "other",
        },
        ["keys", _, ..] => match m {
            "GET" => "get_key",
            "PATCH" => "update_key",
            "DELETE" => "delete_key",
            _ => "other",
        },
        ["deletedkeys"] | ["deletedkeys", ""] if m == "GET" => "list_deleted_keys",
        ["deletedkeys", _, "recover"] if m == "POST" => "recover_key",
        ["deletedkeys", _] if m == "GET" => "get_deleted_key",
        ["deletedkeys", _] if m == "DELETE" => "purge_key",
        ["secrets"] | ["secrets", ""] if m == "GET" => "list_secrets",
        ["secrets", _, "versions"] if m == "GET" => "list_secret_versions",
        ["secrets", _, ..] => match m {
            "PUT" => "set_secret",
            "GET" => "get_secret",
            "PATCH" => "update_secret",
            "DELETE" => "delete_secret",
            _ => "other",
        },
        ["deletedsecrets"] | ["deletedsecrets", ""] if m == "GET" => "list_deleted_secrets",
        ["deletedsecrets", _, "recover"] if m == "POST" => "recover_secret",
        ["deletedsecrets", _] if m == "GET" => "get_deleted_secret",
        ["deletedsecrets", _] if m == "DELETE" => "purge_secret",
        _ => "other",
    }
}

/// The key or secret a data-plane path names.
fn object_of(path: &str) -> Option<String> {
    let mut segs = path.trim_start_matches('/').split('/');
    let root = segs.next()?;
    let name = segs.next()?;
    (DATA_PLANE_ROOTS.contains(&root) && !name.is_empty()).then(|| name.to_string())
}

/// The caller a handler identified (an object id), for the request log.
#[derive(Clone)]
pub struct Caller(pub String);

fn host_of(req: &Request) -> String {
    req.headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or(req.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default()
        .to_string()
}

/// The claims of the request's bearer token if this emulator's Entra signed it and it has not
/// expired (audience and tenant are the handler's to check).
fn verified_claims(shared: &Shared, req: &Request) -> Option<serde_json::Value> {
    let token = req
        .headers()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    shared.token_key.verify(token, 0).ok()
}

/// The `client_id` field of a form body.
fn form_client_id(body: &[u8]) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "client_id")
        .map(|(_, v)| v.into_owned())
}

async fn observe(AxState(shared): AxState<Arc<Shared>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let mut req = req;
    let endpoint = shared.endpoint_for_host(&host_of(&req));
    let service = endpoint
        .as_ref()
        .map(|e| e.service)
        .unwrap_or(Service::KeyVault);
    let route = service_route_label(service, req.method(), req.uri().path());
    let data_plane = route.starts_with("keyvault.") || route.starts_with("managedhsm.");
    let object = data_plane.then(|| object_of(req.uri().path())).flatten();
    let claims = if data_plane {
        verified_claims(&shared, &req)
    } else {
        None
    };
    let mut client_id = claims
        .as_ref()
        .and_then(|c| c["appid"].as_str().map(str::to_string));
    if route == "entra.token" && crate::faults::any_per_identity(&shared.faults) {
        // The client id is in the form body: read it, then hand the body on unchanged.
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        client_id = form_client_id(&bytes);
        req = Request::from_parts(parts, Body::from(bytes));
    }
    if let Some(e) = &endpoint {
        req.extensions_mut().insert(e.clone());
    }
    let fault = if route == "admin" {
        None
    } else {
        crate::faults::take_for(&shared.faults, &route, client_id.as_deref())
    };
    let faulted = fault.is_some();
    let response = match fault {
        Some(FaultKind::Latency { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            next.run(req).await
        }
        Some(FaultKind::Status {
            status,
            retry_after,
        }) => {
            let mut r = fault_response(&route, status, None);
            if let Some(secs) = retry_after
                && let Ok(v) = HeaderValue::from_str(&secs.to_string())
            {
                r.headers_mut().insert("retry-after", v);
            }
            r
        }
        Some(FaultKind::EntraError {
            status,
            error,
            code,
            description,
        }) => fault_response(&route, status, Some((&error, code, description.as_deref()))),
        Some(FaultKind::Drop) => dropped_connection(),
        None => next.run(req).await,
    };
    let status = response.status().as_u16();
    if route != "admin" {
        shared.count(&route, status);
    }
    if data_plane && let Some(e) = &endpoint {
        // Who called: the identity the handler accepted; for a faulted request (no handler
        // ran) the identity of a token this emulator signed.
        let auth = response
            .extensions()
            .get::<AuthInfo>()
            .cloned()
            .or_else(|| {
                let c = claims.as_ref().filter(|_| faulted)?;
                Some(AuthInfo {
                    object_id: c["oid"].as_str()?.to_string(),
                    client_id: c["appid"].as_str().unwrap_or_default().to_string(),
                    tenant: c["tid"].as_str().unwrap_or_default().to_string(),
                })
            });
        shared.records.push(RequestRecord {
            service: e.service.label().to_string(),
            vault: e.name.clone(),
            route: route.clone(),
            object,
            object_id: auth.as_ref().map(|a| a.object_id.clone()),
            client_id: auth.as_ref().map(|a| a.client_id.clone()),
            tenant: auth.as_ref().map(|a| a.tenant.clone()),
            status,
        });
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

/// An injected error: Entra's OAuth error body on Entra's routes, Key Vault's error body
/// elsewhere. `entra` is (error, AADSTS code, description) when the fault chose them.
fn fault_response(route: &str, status: u16, entra: Option<(&str, u32, Option<&str>)>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    if route.starts_with("entra.") {
        let (error, aadsts, description) =
            entra.unwrap_or_else(|| crate::entra::transient_for(status));
        return crate::entra::aadsts_with_status(code, aadsts, error, description);
    }
    let (kv_code, message) = match (entra, status) {
        (Some((error, _, description)), _) => (
            error.to_string(),
            description.unwrap_or("injected fault").to_string(),
        ),
        (None, 429) => (
            "Throttled".to_string(),
            "Request was not processed because too many requests were received. Reason: injected fault.".to_string(),
        ),
        (None, 500) => (
            "InternalServerError".to_string(),
            "An unexpected error occurred (injected fault).".to_string(),
        ),
        (None, 503) => (
            "ServiceUnavailable".to_string(),
            "The service is temporarily unavailable (injected fault).".to_string(),
        ),
        (None, s) => ("Throttled".to_string(), format!("injected fault: HTTP {s}")),
    };
    (
        code,
        axum::Json(serde_json::json!({"error": {"code": kv_code, "message": message}})),
    )
        .into_response()
}

/// An injected connection drop: headers go out, then the body breaks off, and the client sees
/// the connection die.
pub(crate) fn dropped_connection() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-length", "1024")
        .body(Body::from_stream(BrokenBody(false)))
        .unwrap_or_default()
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
