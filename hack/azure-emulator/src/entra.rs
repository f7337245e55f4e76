//! Entra ID, the client-assertion (workload identity) flow: OpenID discovery, MSAL's instance
//! discovery, and the v2.0 token endpoint, issuing v1.0-shaped access tokens for one known
//! resource per request (Key Vault, Managed HSM, Storage, ...) with the lifetime of the
//! identity's kind. An assertion is accepted the way Entra accepts one for a federated identity
//! credential: issuer, subject and audience must match a credential of the client id, the
//! signature must verify against the JWKS the issuer publishes (fetched over HTTPS, cached for
//! a minute), and exp/nbf hold within Entra's five-minute clock skew. Errors carry the real
//! AADSTS codes in Entra's JSON shape.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::{Value, json};

use crate::config::FederatedCredential;
use crate::crypto;
use crate::server::{Caller, Shared};

/// Access-token lifetime for a managed identity: about a day, as Entra issues them.
pub const MANAGED_IDENTITY_TOKEN_SECS: u64 = 86_400;
/// Access-token lifetime for an app registration: an hour.
pub const APP_TOKEN_SECS: u64 = 3_600;

/// The resources this Entra issues tokens for (their application id URIs).
pub const KNOWN_RESOURCES: &[&str] = &[
    KEYVAULT_RESOURCE,
    MANAGED_HSM_RESOURCE,
    STORAGE_RESOURCE,
    "https://management.azure.com",
    "https://graph.microsoft.com",
];

/// The one resource a client-credentials `scope` asks for (`{resource}/.default`), or
/// Entra's refusal: no `.default` scope or several resources is AADSTS70011 invalid_scope
/// (as Entra answers, Azure/azure-sdk-for-net#9076), an unknown resource AADSTS500011
/// invalid_resource (https://learn.microsoft.com/entra/identity-platform/reference-error-codes).
fn resource_of_scope(scope: &str, tenant: &str) -> Result<String, Response> {
    let invalid = |why: &str| {
        aadsts(
            70011,
            "invalid_scope",
            &format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid.{why}"
            ),
        )
    };
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let mut resources: Vec<String> = Vec::new();
    for s in &scopes {
        match s.strip_suffix("/.default") {
            Some(r) => {
                let r = r.trim_end_matches('/').to_string();
                if !resources.contains(&r) {
                    resources.push(r);
                }
            }
            None => return Err(invalid(" The scope requested must end in /.default.")),
        }
    }
    let resource = match resources.as_slice() {
        [one] => one.clone(),
        [] => return Err(invalid(" The scope requested must end in /.default.")),
        _ => return Err(invalid("")),
    };
    if !KNOWN_RESOURCES.contains(&resource.as_str()) {
        return Err(aadsts(
            500011,
            "invalid_resource",
            &format!(
                "The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
        ));
    }
    Ok(resource)
}

/// Entra's tolerance for clock skew on an assertion's exp and nbf.
pub const CLOCK_SKEW_SECS: u64 = 300;
const JWKS_TTL: Duration = Duration::from_secs(60);
/// The audience Key Vault access tokens carry.
pub const KEYVAULT_RESOURCE: &str = "https://vault.azure.net";
/// The audience Managed HSM access tokens carry.
pub const MANAGED_HSM_RESOURCE: &str = "https://managedhsm.azure.net";
/// The audience Azure Storage access tokens carry.
pub const STORAGE_RESOURCE: &str = "https://storage.azure.com";

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/{tenant}/discovery/instance", get(instance_discovery))
        .route("/{tenant}/oauth2/v2.0/token", post(token))
}

/// The host clients see, from the Host header (falls back to the listen address).
fn authority(shared: &Shared, headers: &HeaderMap) -> String {
    headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(|h| format!("https://{h}"))
        .unwrap_or_else(|| shared.base_url.clone())
}

async fn openid_configuration(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !shared.lock().tenants.contains_key(&tenant)
        && tenant != "common"
        && tenant != "organizations"
    {
        return aadsts(
            90002,
            "invalid_tenant",
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    }
    let base = authority(&shared, &headers);
    Json(json!({
        "token_endpoint": format!("{base}/{tenant}/oauth2/v2.0/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{base}/{tenant}/discovery/v2.0/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": format!("{base}/{tenant}/v2.0"),
        "request_uri_parameter_supported": false,
        "authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/authorize"),
        "device_authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/devicecode"),
        "end_session_endpoint": format!("{base}/{tenant}/oauth2/v2.0/logout"),
        "tenant_region_scope": "WW",
        "cloud_instance_name": "microsoftonline.com",
    }))
    .into_response()
}

async fn instance_discovery(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let base = authority(&shared, &headers);
    let host = base.trim_start_matches("https://").to_string();
    let tenant = query
        .get("authorization_endpoint")
        .and_then(|e| {
            e.trim_start_matches(&base)
                .trim_start_matches('/')
                .split('/')
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "common".into());
    Json(json!({
        "tenant_discovery_endpoint": format!("{base}/{tenant}/v2.0/.well-known/openid-configuration"),
        "api-version": "1.1",
        "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
    }))
    .into_response()
}

/// An Entra error response, with the status Entra gives `error` (401 for invalid_client,
/// else 400).
pub fn aadsts(code: u32, error: &str, description: &str) -> Response {
    let status = if error == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    aadsts_with_status(status, code, error, Some(description))
}

/// An Entra error response in the shape of
/// https://learn.microsoft.com/entra/identity-platform/reference-error-codes (`error`,
/// `error_description` starting "AADSTSnnnnn: ", `error_codes`, `timestamp`, `trace_id`,
/// `correlation_id`, `error_uri`). `description` None takes a stock text for the code.
pub fn aadsts_with_status(
    status: StatusCode,
    code: u32,
    error: &str,
    description: Option<&str>,
) -> Response {
    let trace = crypto::random_guid();
    let correlation = crypto::random_guid();
    let now = chrono_like_now();
    let description = description.unwrap_or_else(|| stock_description(code));
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {now}"),
        "error_codes": [code],
        "timestamp": now,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, Json(body)).into_response()
}

/// The text Entra gives a code, for the codes faults are likely to inject
/// (https://learn.microsoft.com/entra/identity-platform/reference-error-codes).
fn stock_description(code: u32) -> &'static str {
    match code {
        90006 => "ExternalServerRetryableError - The service is temporarily unavailable.",
        90033 => {
            "MsodsServiceUnavailable - The Microsoft Online Directory Service (MSODS) isn't available."
        }
        90055 => "TenantThrottlingError - There are too many incoming requests.",
        70021 => "No matching federated identity record found for presented assertion.",
        700016 => "Application was not found in the directory.",
        50013 => "Assertion failed signature validation.",
        _ => "Injected error.",
    }
}

/// The `error` and AADSTS code Entra answers a transient failure of HTTP `status` with: 429
/// tenant throttling, 5xx the service unavailable.
pub fn transient_for(status: u16) -> (&'static str, u32, Option<&'static str>) {
    match status {
        429 => ("temporarily_unavailable", 90055, None),
        500 => ("server_error", 90006, None),
        _ => ("temporarily_unavailable", 90033, None),
    }
}

fn chrono_like_now() -> String {
    // RFC 3339 without a date crate: seconds since the epoch turned into a UTC date-time.
    let secs = crypto::now();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn audiences(claims: &Value) -> Vec<String> {
    match &claims["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let (client_id, identity) = {
        let state = shared.lock();
        if !state.tenants.contains_key(&tenant) {
            return aadsts(
                90002,
                "invalid_request",
                &format!(
                    "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
                ),
            );
        }
        let client_id = field("client_id").to_string();
        (
            client_id.clone(),
            state.identity(&tenant, &client_id).cloned(),
        )
    };
    if field("grant_type") != "client_credentials" {
        return aadsts(
            70003,
            "unsupported_grant_type",
            "The app requested an unsupported grant type.",
        );
    }
    if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
        return aadsts(
            900144,
            "invalid_request",
            "The request body must contain the following parameter: 'client_assertion_type'.",
        );
    }
    let Some(identity) = identity else {
        return aadsts(
            700016,
            "unauthorized_client",
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        );
    };
    let assertion = field("client_assertion");
    let Some((header, claims)) = crypto::peek_jwt(assertion) else {
        return aadsts(
            50027,
            "invalid_request",
            "JWT token is invalid or malformed.",
        );
    };
    let iss = claims["iss"].as_str().unwrap_or_default().to_string();
    let sub = claims["sub"].as_str().unwrap_or_default().to_string();
    let auds = audiences(&claims);
    let matching: Option<&FederatedCredential> = identity.federated_credentials.iter().find(|fc| {
        fc.issuer.replace("{emulator}", &shared.base_url) == iss
            && fc.subject == sub
            && auds.iter().any(|a| fc.audiences.contains(a))
    });
    if matching.is_none() {
        return aadsts(
            70021,
            "invalid_request",
            &format!(
                "No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{}'.",
                auds.join(",")
            ),
        );
    }
    let keys = match issuer_keys(&shared, &iss).await {
        Ok(k) => k,
        Err(e) => {
            return aadsts(
                50166,
                "invalid_client",
                &format!("Request to External OIDC endpoint failed. Issuer: '{iss}'. {e}"),
            );
        }
    };
    let kid = header["kid"].as_str().unwrap_or_default();
    let Some(jwk) = keys.iter().find(|k| k["kid"].as_str() == Some(kid)) else {
        return aadsts(
            50013,
            "invalid_client",
            "Assertion failed signature validation. [Reason - The key was not found.]",
        );
    };
    if let Err(e) = crypto::verify_with_jwk::<Value>(assertion, jwk, CLOCK_SKEW_SECS) {
        return if e.contains("Expired") || e.contains("ImmatureSignature") {
            aadsts(
                700024,
                "invalid_client",
                "Client assertion is not within its valid time range.",
            )
        } else {
            aadsts(
                50013,
                "invalid_client",
                "Assertion failed signature validation.",
            )
        };
    }
    let scope = field("scope");
    let resource = match resource_of_scope(scope, &tenant) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let now = crypto::now();
    let lifetime = identity.token_lifetime_secs.unwrap_or(if identity.managed {
        MANAGED_IDENTITY_TOKEN_SECS
    } else {
        APP_TOKEN_SECS
    });
    // Access tokens in the v1.0 shape the resources take
    // (https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference): the
    // resource applications (Key Vault, Managed HSM, Storage) accept v1.0 tokens.
    let mut claims = json!({
        "aud": resource,
        "iss": format!("https://sts.windows.net/{tenant}/"),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "appid": identity.client_id,
        "appidacr": "2",
        "idp": format!("https://sts.windows.net/{tenant}/"),
        "idtyp": "app",
        "oid": identity.object_id,
        "sub": identity.object_id,
        "tid": tenant,
        "uti": crypto::random_hex(11),
        "ver": "1.0",
    });
    if identity.managed {
        claims["xms_mirid"] = json!(format!(
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/emulator/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
            identity.name
        ));
    }
    let access_token = match shared.token_key.sign(&claims) {
        Ok(t) => t,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    };
    let mut response = Json(json!({
        "token_type": "Bearer",
        "expires_in": lifetime.saturating_sub(1),
        "ext_expires_in": lifetime.saturating_sub(1),
        "access_token": access_token,
    }))
    .into_response();
    response
        .extensions_mut()
        .insert(Caller(identity.object_id.clone()));
    response
}

/// The signing keys the issuer publishes: its discovery document's `jwks_uri`, fetched over
/// HTTPS and cached.
async fn issuer_keys(shared: &Shared, iss: &str) -> Result<Vec<Value>, String> {
    if let Ok(cache) = shared.jwks_cache.lock()
        && let Some((at, keys)) = cache.get(iss)
        && at.elapsed() < JWKS_TTL
    {
        return Ok(keys.clone());
    }
    let discovery_url = format!(
        "{}/.well-known/openid-configuration",
        iss.trim_end_matches('/')
    );
    let discovery: Value = fetch_json(shared, &discovery_url).await?;
    let jwks_uri = discovery["jwks_uri"]
        .as_str()
        .ok_or("the discovery document has no jwks_uri")?;
    let jwks: Value = fetch_json(shared, jwks_uri).await?;
    let keys = jwks["keys"]
        .as_array()
        .cloned()
        .ok_or("the JWKS has no keys")?;
    if let Ok(mut cache) = shared.jwks_cache.lock() {
        cache.insert(iss.to_string(), (Instant::now(), keys.clone()));
    }
    Ok(keys)
}

async fn fetch_json(shared: &Shared, url: &str) -> Result<Value, String> {
    if !url.starts_with("https://") {
        return Err(format!("{url} is not an HTTPS URL"));
    }
    let response = shared
        .http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    response.json().await.map_err(|e| format!("GET {url}: {e}"))
}
