//! The Blob gateway: Azure Blob Storage's data plane for the configured storage accounts, on a
//! port of its own, path-style as Azurite serves it
//! (`https://127.0.0.1:PORT/{account}/{container}/{blob}`). Azurite stores the blobs but
//! verifies no token signature and checks no role, so every request passes here first: a
//! bearer token this emulator's Entra signed for `https://storage.azure.com` (else 401 with the
//! challenge Azure Storage sends), the caller's Storage Blob Data roles (else 403
//! AuthorizationPermissionMismatch), injected faults on routes `blob.<op>`, counters and one
//! log line; then the request goes to Azurite and its answer comes back unchanged, bodies
//! streamed both ways (blobs can be gigabytes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::azurite::Azurite;
use crate::entra::STORAGE_RESOURCE;
use crate::faults::FaultKind;
use crate::rbac::{self, BlobAccess};
use crate::server::Shared;
use crate::{crypto, faults, server};

/// The gateway's view of the storage accounts and of Azurite behind it.
pub struct Gateway {
    pub port: u16,
    /// Azurite's `https://127.0.0.1:PORT`.
    pub azurite_url: String,
    /// Each account's containers, as configured.
    pub accounts: BTreeMap<String, Vec<String>>,
    /// The tenant the accounts belong to (the configuration's first): tokens of other tenants
    /// are refused, as a storage account refuses them.
    pub tenant: String,
    /// Trusts the emulator's CA; no overall timeout (bodies are long), no decompression (bodies
    /// pass through as they are), no redirects.
    pub http: reqwest::Client,
}

impl Gateway {
    pub fn new(
        port: u16,
        azurite: &Azurite,
        accounts: &[crate::config::StorageAccountConfig],
        tenant: String,
        ca: reqwest::Certificate,
    ) -> Result<Gateway, String> {
        let http = reqwest::Client::builder()
            .tls_certs_only([ca])
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            // Below Azurite's 5 s keep-alive timeout: a connection Node is about to close is
            // never reused, which would fail a request whose body cannot be sent again.
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Gateway {
            port,
            azurite_url: azurite.url.clone(),
            accounts: accounts
                .iter()
                .map(|a| (a.name.clone(), a.containers.clone()))
                .collect(),
            tenant,
            http,
        })
    }

    /// `https://127.0.0.1:PORT/{account}` for a configured account.
    pub fn account_url(&self, account: &str) -> Option<String> {
        self.accounts
            .contains_key(account)
            .then(|| format!("https://127.0.0.1:{}/{account}", self.port))
    }

    /// A storage token for Azurite itself (container creation at start): the issuer and
    /// audience Azurite's basic OAuth checks, signed with the emulator's key although Azurite
    /// does not verify it, for an object id no role assignment can name.
    pub fn azurite_token(&self, shared: &Shared) -> Result<String, String> {
        let now = crypto::now();
        shared.token_key.sign(&json!({
            "aud": STORAGE_RESOURCE,
            "iss": format!("https://sts.windows.net/{}/", self.tenant),
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "oid": crypto::random_guid(),
            "tid": self.tenant,
            "ver": "1.0",
        }))
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// What a request is for: its route label, where its roles are looked up, and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub op: &'static str,
    pub account: String,
    /// None: the account's scope only (listing, creating or deleting containers).
    pub container: Option<String>,
    pub access: BlobAccess,
}

/// Names a request by its method, path (`/{account}[/{container}[/{blob...}]]`) and the
/// `restype` and `comp` query parameters, as the Blob REST API tells operations apart. None
/// when the path names no account.
pub fn target(method: &Method, path: &str, query: Option<&str>) -> Option<Target> {
    let param = |name: &str| {
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let (restype, comp) = (param("restype"), param("comp"));
    let mut segs = path.trim_start_matches('/').splitn(3, '/');
    let account = segs.next().filter(|s| !s.is_empty())?.to_string();
    let container = segs.next().filter(|s| !s.is_empty());
    let blob = segs.next().filter(|s| !s.is_empty());
    let access = match *method {
        Method::GET | Method::HEAD => BlobAccess::Read,
        Method::DELETE => BlobAccess::Delete,
        _ => BlobAccess::Write,
    };
    let m = method.as_str();
    let (op, container) = match (container, blob) {
        (None, _) => ("account", None),
        (Some(c), None) => match (restype.as_deref(), comp.as_deref()) {
            (Some("container"), Some("list")) => ("list", Some(c)),
            // Creating and deleting containers is the account's business.
            (Some("container"), None) if matches!(m, "PUT" | "DELETE") => ("container", None),
            (Some("container"), _) => ("container", Some(c)),
            _ => ("other", Some(c)),
        },
        (Some(c), Some(_)) => {
            let op = match (m, comp.as_deref()) {
                ("PUT", Some("block")) => "put_block",
                ("PUT", Some("blocklist")) => "put_block_list",
                ("GET", Some("blocklist")) => "get_block_list",
                ("GET", None) => "get",
                ("HEAD", None) => "head",
                ("PUT", None) => "put",
                ("DELETE", None) => "delete",
                (_, Some("metadata")) => "metadata",
                (_, Some("properties")) => "properties",
                (_, Some("lease")) => "lease",
                (_, Some("tags")) => "tags",
                _ => "other",
            };
            (op, Some(c))
        }
    };
    Some(Target {
        op,
        account,
        container: container.map(str::to_string),
        access,
    })
}

/// Why a request is not authenticated.
enum AuthError {
    Missing,
    /// Azure's AuthenticationErrorDetail.
    Invalid(&'static str),
}

/// The claims of the request's bearer token if this emulator's Entra signed it for Storage in
/// the accounts' tenant and it is within its lifetime.
fn authenticate(shared: &Shared, gw: &Gateway, headers: &HeaderMap) -> Result<Value, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(AuthError::Invalid(
            "Authentication scheme is not supported: the gateway takes Entra bearer tokens only.",
        ))?;
    let claims: Value = shared.token_key.verify(token, 0).map_err(|e| {
        AuthError::Invalid(if e.contains("ExpiredSignature") {
            "Lifetime validation failed. The token is expired."
        } else if e.contains("ImmatureSignature") {
            "Lifetime validation failed. The token is not yet valid."
        } else {
            "Signature validation failed. Signature is invalid."
        })
    })?;
    let audiences = match &claims["aud"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences
        .iter()
        .any(|a| a.trim_end_matches('/') == STORAGE_RESOURCE)
    {
        return Err(AuthError::Invalid(
            "Audience validation failed. Audience did not match.",
        ));
    }
    if claims["tid"].as_str() != Some(gw.tenant.as_str()) {
        return Err(AuthError::Invalid(
            "Issuer validation failed. Issuer did not match.",
        ));
    }
    Ok(claims)
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let start = Instant::now();
    let Some(gw) = shared.blob.as_ref() else {
        return storage_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            "The specified resource does not exist.",
        );
    };
    let target = target(req.method(), req.uri().path(), req.uri().query());
    let route = format!("blob.{}", target.as_ref().map_or("other", |t| t.op));
    let auth = authenticate(&shared, gw, req.headers());
    let claim = |name: &str| {
        auth.as_ref()
            .ok()
            .and_then(|c| c[name].as_str())
            .map(str::to_string)
    };
    let (caller, client_id) = (claim("oid").unwrap_or_default(), claim("appid"));
    let response = match faults::take_for(&shared.faults, &route, client_id.as_deref()) {
        Some(FaultKind::Latency { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            serve(&shared, gw, req, target, auth).await
        }
        Some(FaultKind::Status {
            status,
            retry_after,
        }) => {
            let (code, message) = fault_error(status);
            let mut r = storage_error(status_code(status), code, message);
            if let Some(secs) = retry_after
                && let Ok(v) = HeaderValue::from_str(&secs.to_string())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        Some(FaultKind::EntraError {
            status,
            error,
            description,
            ..
        }) => storage_error(
            status_code(status),
            &error,
            description.as_deref().unwrap_or("Injected fault."),
        ),
        Some(FaultKind::Drop) => server::dropped_connection(),
        None => serve(&shared, gw, req, target, auth).await,
    };
    let status = response.status().as_u16();
    shared.count(&route, status);
    tracing::info!(
        route,
        caller,
        status,
        latency_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}

/// Authenticates, authorizes and forwards one request.
async fn serve(
    shared: &Shared,
    gw: &Gateway,
    req: Request,
    target: Option<Target>,
    auth: Result<Value, AuthError>,
) -> Response {
    let claims = match auth {
        Ok(c) => c,
        Err(e) => return unauthenticated(gw, e),
    };
    let Some(t) = target else {
        return storage_error(
            StatusCode::BAD_REQUEST,
            "InvalidUri",
            "The requested URI does not represent any resource on the server.",
        );
    };
    let principal = claims["oid"].as_str().unwrap_or_default();
    let allowed = {
        let mut state = shared.lock();
        rbac::blob_allowed(
            state.effective_roles(),
            principal,
            &t.account,
            t.container.as_deref(),
            t.access,
        )
    };
    if !allowed {
        return storage_error(
            StatusCode::FORBIDDEN,
            "AuthorizationPermissionMismatch",
            "This request is not authorized to perform this operation using this permission.",
        );
    }
    forward(gw, req).await
}

/// Headers that belong to one connection, not to the request or response (RFC 9110 7.6.1),
/// plus Host: reqwest names Azurite's.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
            | "host"
    )
}

/// Sends the request to Azurite as it came (method, path, query, end-to-end headers, body
/// streamed) and returns Azurite's answer as it comes.
async fn forward(gw: &Gateway, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut out = gw
        .http
        .request(parts.method.clone(), format!("{}{path}", gw.azurite_url));
    for (name, value) in parts.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        out = out.header(name, value);
    }
    // A body only when there is one: an empty stream would go out chunked.
    if !body.is_end_stream() {
        out = out.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let answer = match out.send().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "Blob gateway: Azurite did not answer");
            return storage_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "The server encountered an internal error. Please retry the request.",
            );
        }
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers().iter().filter(|(n, _)| !hop_by_hop(n)) {
        response = response.header(name, value);
    }
    response
        .body(Body::from_stream(answer.bytes_stream()))
        .unwrap_or_default()
}

/// 401 as Azure Storage answers it, with the challenge naming the tenant's authority.
fn unauthenticated(gw: &Gateway, e: AuthError) -> Response {
    let message = "Server failed to authenticate the request. Please refer to the information in the www-authenticate header.";
    let mut r = match e {
        // No credentials at all: Azure's code for that, since API version 2019-12-12.
        AuthError::Missing => storage_error(
            StatusCode::UNAUTHORIZED,
            "NoAuthenticationInformation",
            message,
        ),
        AuthError::Invalid(detail) => storage_error_with_detail(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationInfo",
            message,
            Some(detail),
        ),
    };
    let challenge = format!(
        "Bearer authorization_uri=https://login.microsoftonline.com/{}/oauth2/authorize resource_id={STORAGE_RESOURCE}",
        gw.tenant
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
}

/// The Storage error code and message of an injected status
/// (https://learn.microsoft.com/rest/api/storageservices/common-rest-api-error-codes).
fn fault_error(status: u16) -> (&'static str, &'static str) {
    match status {
        503 | 429 => (
            "ServerBusy",
            "The server is currently unable to receive requests. Please retry your request.",
        ),
        500 => (
            "InternalError",
            "The server encountered an internal error. Please retry the request.",
        ),
        _ => ("InternalError", "Injected fault."),
    }
}

fn storage_error(status: StatusCode, code: &str, message: &str) -> Response {
    storage_error_with_detail(status, code, message, None)
}

/// An error in Azure Storage's shape: XML `Error` with `Code` and a `Message` whose last lines
/// are the request id and time, and the code again in `x-ms-error-code`.
fn storage_error_with_detail(
    status: StatusCode,
    code: &str,
    message: &str,
    detail: Option<&str>,
) -> Response {
    let request_id = crypto::random_guid();
    let detail = detail
        .map(|d| format!("<AuthenticationErrorDetail>{d}</AuthenticationErrorDetail>"))
        .unwrap_or_default();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{message}\nRequestId:{request_id}\nTime:{}</Message>{detail}</Error>",
        storage_time()
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/xml")
        .header("x-ms-error-code", code)
        .header("x-ms-request-id", request_id)
        .body(Body::from(body))
        .unwrap_or_default()
}

/// Now as Azure Storage writes it in errors: `2024-05-01T12:34:56.1234567Z`.
fn storage_time() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (y, m, d) = crate::entra::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:07}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        now.subsec_nanos() / 100
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: Method, path: &str, query: &str) -> Option<(&'static str, Option<String>)> {
        target(&method, path, Some(query)).map(|t| (t.op, t.container))
    }

    #[test]
    fn requests_are_named_and_scoped() {
        let c = Some("backups".to_string());
        assert_eq!(
            op(Method::PUT, "/acct/backups/a/b", "comp=block&blockid=AA"),
            Some(("put_block", c.clone()))
        );
        assert_eq!(
            op(Method::PUT, "/acct/backups/b", "comp=blocklist"),
            Some(("put_block_list", c.clone()))
        );
        assert_eq!(
            op(
                Method::GET,
                "/acct/backups/b",
                "comp=blocklist&blocklisttype=all"
            ),
            Some(("get_block_list", c.clone()))
        );
        assert_eq!(
            op(Method::HEAD, "/acct/backups/b", ""),
            Some(("head", c.clone()))
        );
        assert_eq!(
            op(Method::GET, "/acct/backups", "restype=container&comp=list"),
            Some(("list", c.clone()))
        );
        // Creating or deleting a container needs the account's scope; reading it does not.
        assert_eq!(
            op(Method::PUT, "/acct/backups", "restype=container"),
            Some(("container", None))
        );
        assert_eq!(
            op(Method::GET, "/acct/backups", "restype=container"),
            Some(("container", c))
        );
        assert_eq!(
            op(Method::GET, "/acct", "comp=list"),
            Some(("account", None))
        );
        assert_eq!(op(Method::GET, "/", ""), None);
        let t = target(&Method::DELETE, "/acct/backups/b", None).unwrap_or_else(|| panic!());
        assert_eq!((t.op, t.access), ("delete", BlobAccess::Delete));
    }

    #[test]
    fn error_times_look_like_azure_storage() {
        let t = storage_time();
        assert_eq!(t.len(), "2024-05-01T12:34:56.1234567Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
