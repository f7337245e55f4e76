//! Key Vault's data plane, several vaults on one emulator chosen by Host header: each vault has
//! its own port on 127.0.0.1, so `https://127.0.0.1:PORT` is a vault URL with nothing after
//! it, as the SDKs' key and secret id parsers expect, and no DNS is needed. A request without a bearer token
//! gets the 401 challenge naming the vault's tenant; a token is checked (signature, audience,
//! expiry, tenant) and the caller's RBAC roles decide. Error bodies have Key Vault's shape.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::config::KeySpec;
use crate::crypto;
use crate::entra::KEYVAULT_RESOURCE;
use crate::rbac::{self, Action};
use crate::records::AuthInfo;
use crate::server::{Caller, Shared};
use crate::state::{KeyVersion, SecretVersion};

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/keys/{*rest}", any(handle))
        .route("/secrets/{*rest}", any(handle))
}

pub fn error(status: StatusCode, code: &str, message: &str, inner: Option<&str>) -> Response {
    let mut body = json!({"error": {"code": code, "message": message}});
    if let Some(inner) = inner {
        body["error"]["innererror"] = json!({"code": inner});
    }
    (status, Json(body)).into_response()
}

/// API versions as the current SDKs send them: "7.x" (with an optional "-preview") and
/// dated ones such as "2025-07-01".
fn api_version_ok(v: &str) -> bool {
    let (base, _) = v.split_once("-preview").unwrap_or((v, ""));
    let seven = base
        .strip_prefix("7.")
        .is_some_and(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()));
    let dated = base.len() == 10
        && base.chars().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    seven || dated
}

struct Ctx<'a> {
    shared: &'a Shared,
    vault: String,
    vault_url: String,
    oid: String,
    appid: String,
}

impl Ctx<'_> {
    fn check(&self, object: &str, action: Action) -> Result<(), Response> {
        let state = self.shared.lock();
        if rbac::allowed(
            &state.role_assignments,
            &self.oid,
            &self.vault,
            object,
            action,
        ) {
            return Ok(());
        }
        Err(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid={};oid={}\r\nAction: '{}'\r\nResource: '/vaults/{}/{}'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\nVault: {};location=emulator\r\n",
                self.appid,
                self.oid,
                action.data_action(),
                self.vault,
                object,
                self.vault
            ),
            Some("ForbiddenByRbac"),
        ))
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or(uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let Some(vault) = shared.vault_for_host(host) else {
        return error(
            StatusCode::NOT_FOUND,
            "VaultNotFound",
            &format!("No vault listens at {host}; each vault has its own port."),
            None,
        );
    };
    let rest = uri.path().trim_start_matches('/').to_string();
    // segs[0] is the vault's place in the old path-prefixed layout; keep indices uniform.
    let segs: Vec<&str> = std::iter::once("").chain(rest.split('/')).collect();
    let tenant = match shared.lock().vaults.get(&vault) {
        Some(v) => v.tenant.clone(),
        None => {
            return error(
                StatusCode::NOT_FOUND,
                "VaultNotFound",
                &format!("Vault {vault} does not exist on this emulator."),
                None,
            );
        }
    };
    match query.get("api-version") {
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                "The 'api-version' query parameter is missing.",
                None,
            );
        }
        Some(v) if !api_version_ok(v) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                &format!(
                    "The specified version ({v}) is not recognized. Consider using the latest supported version (7.6)."
                ),
                None,
            );
        }
        Some(_) => {}
    }
    let claims = match authenticate(&shared, &tenant, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let ctx = Ctx {
        shared: &shared,
        vault: vault.clone(),
        vault_url: shared.vault_url(&vault).unwrap_or_default(),
        oid: claims["oid"].as_str().unwrap_or_default().to_string(),
        appid: claims["appid"].as_str().unwrap_or_default().to_string(),
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadParameter",
                    &format!("The request body is not valid JSON: {e}"),
                    None,
                );
            }
        }
    };
    let mut response = match (method.as_str(), &segs[1..]) {
        ("POST", ["keys", name, "create"]) => create_key(&ctx, name, &body),
        ("POST", ["keys", name, "rotate"]) => rotate_key(&ctx, name),
        ("GET", ["keys", name]) | ("GET", ["keys", name, ""]) => get_key(&ctx, name, None),
        ("GET", ["keys", name, version]) => get_key(&ctx, name, Some(version)),
        ("PATCH", ["keys", name]) | ("PATCH", ["keys", name, ""]) => {
            update_key(&ctx, name, None, &body)
        }
        ("PATCH", ["keys", name, version]) => update_key(&ctx, name, Some(version), &body),
        ("DELETE", ["keys", name]) => delete_key(&ctx, name),
        ("POST", ["keys", name, version, op])
            if matches!(*op, "wrapkey" | "unwrapkey" | "encrypt" | "decrypt") =>
        {
            key_operation(
                &ctx,
                name,
                (!version.is_empty()).then_some(*version),
                op,
                &body,
            )
        }
        ("POST", ["keys", name, op])
            if matches!(*op, "wrapkey" | "unwrapkey" | "encrypt" | "decrypt") =>
        {
            key_operation(&ctx, name, None, op, &body)
        }
        ("PUT", ["secrets", name]) => set_secret(&ctx, name, &body),
        ("GET", ["secrets", name]) | ("GET", ["secrets", name, ""]) => get_secret(&ctx, name, None),
        ("GET", ["secrets", name, version]) => get_secret(&ctx, name, Some(version)),
        ("DELETE", ["secrets", name]) => delete_secret(&ctx, name),
        _ => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{method} /{rest} is not an operation this emulator serves."),
            None,
        ),
    };
    response.extensions_mut().insert(Caller(ctx.oid.clone()));
    response.extensions_mut().insert(AuthInfo {
        object_id: ctx.oid.clone(),
        client_id: ctx.appid.clone(),
        tenant: claims["tid"].as_str().unwrap_or_default().to_string(),
    });
    response
}

fn challenge(shared: &Shared, tenant: &str, message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "Unauthorized", message, None);
    let value = format!(
        "Bearer authorization=\"{}/{tenant}\", resource=\"{KEYVAULT_RESOURCE}\"",
        shared.base_url
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().insert("www-authenticate", v);
    }
    r
}

fn authenticate(shared: &Shared, tenant: &str, headers: &HeaderMap) -> Result<Value, Response> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return Err(challenge(
            shared,
            tenant,
            "AKV10000: Request is missing a Bearer or PoP token.",
        ));
    };
    let claims: Value = shared
        .token_key
        .verify(token, 0)
        .map_err(|e| challenge(shared, tenant, &format!("AKV10032: Invalid token: {e}.")))?;
    let aud = claims["aud"].as_str().unwrap_or_default();
    if aud.trim_end_matches('/') != KEYVAULT_RESOURCE {
        return Err(challenge(
            shared,
            tenant,
            &format!("AKV10022: Invalid audience. Expected {KEYVAULT_RESOURCE}, found: {aud}."),
        ));
    }
    if claims["tid"].as_str() != Some(tenant) {
        return Err(challenge(
            shared,
            tenant,
            &format!(
                "AKV10032: Invalid issuer. Expected one of {}/{tenant}/v2.0.",
                shared.base_url
            ),
        ));
    }
    Ok(claims)
}

fn key_not_found(name: &str, vault: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        &format!(
            "A key with (name/id) {name} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182 (vault {vault})"
        ),
        None,
    )
}

fn secret_not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "SecretNotFound",
        &format!(
            "A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
        None,
    )
}

fn key_bundle(ctx: &Ctx, name: &str, v: &KeyVersion) -> Value {
    let kid = format!("{}/keys/{name}/{}", ctx.vault_url, v.version);
    let mut key = json!({"kid": kid, "kty": v.kty});
    if v.kty == "RSA" {
        let material = crypto::b64_decode(&v.material).unwrap_or_default();
        let (n, e) = crypto::rsa_public(&material).unwrap_or_default();
        key["n"] = json!(crypto::b64url(&n));
        key["e"] = json!(crypto::b64url(&e));
        key["key_ops"] = json!([
            "encrypt",
            "decrypt",
            "sign",
            "verify",
            "wrapKey",
            "unwrapKey"
        ]);
    } else {
        key["key_ops"] = json!(["encrypt", "decrypt", "wrapKey", "unwrapKey"]);
    }
    json!({
        "key": key,
        "attributes": {"enabled": v.enabled, "created": v.created, "updated": v.updated, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90, "exportable": false},
        "tags": {},
    })
}

/// The named version, or the latest.
fn find_key(ctx: &Ctx, name: &str, version: Option<&str>) -> Result<KeyVersion, Response> {
    let state = ctx.shared.lock();
    let versions = state
        .vaults
        .get(&ctx.vault)
        .and_then(|v| v.keys.get(name))
        .ok_or_else(|| key_not_found(name, &ctx.vault))?;
    match version {
        None => versions.last().cloned(),
        Some(ver) => versions.iter().find(|k| k.version == ver).cloned(),
    }
    .ok_or_else(|| key_not_found(name, &ctx.vault))
}

fn create_key(ctx: &Ctx, name: &str, body: &Value) -> Response {
    if let Err(r) = ctx.check(&format!("keys/{name}"), Action::KeyCreate) {
        return r;
    }
    let spec = KeySpec {
        name: name.to_string(),
        kty: body["kty"].as_str().unwrap_or("RSA").to_string(),
        size: body["key_size"].as_u64().map(|s| s as u32),
    };
    new_key_version(ctx, name, &spec)
}

fn rotate_key(ctx: &Ctx, name: &str) -> Response {
    if let Err(r) = ctx.check(&format!("keys/{name}"), Action::KeyRotate) {
        return r;
    }
    let latest = match find_key(ctx, name, None) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let size = (latest.kty == "RSA").then(|| {
        crypto::rsa_bits(&crypto::b64_decode(&latest.material).unwrap_or_default()) as u32
    });
    let spec = KeySpec {
        name: name.to_string(),
        kty: latest.kty.clone(),
        size: size.or(Some(256)),
    };
    new_key_version(ctx, name, &spec)
}

/// Creates a key, or its next version (rotation), persists the state, and answers the bundle.
fn new_key_version(ctx: &Ctx, name: &str, spec: &KeySpec) -> Response {
    let mut state = ctx.shared.lock();
    match state.create_key(&ctx.vault, spec) {
        Ok(v) => {
            let _ = state.save();
            drop(state);
            Json(key_bundle(ctx, name, &v)).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, "BadParameter", &e, None),
    }
}

fn get_key(ctx: &Ctx, name: &str, version: Option<&str>) -> Response {
    if let Err(r) = ctx.check(&format!("keys/{name}"), Action::KeyRead) {
        return r;
    }
    match find_key(ctx, name, version) {
        Ok(k) => Json(key_bundle(ctx, name, &k)).into_response(),
        Err(r) => r,
    }
}

fn update_key(ctx: &Ctx, name: &str, version: Option<&str>, body: &Value) -> Response {
    if let Err(r) = ctx.check(&format!("keys/{name}"), Action::KeyUpdate) {
        return r;
    }
    let target = match find_key(ctx, name, version) {
        Ok(k) => k.version,
        Err(r) => return r,
    };
    let mut state = ctx.shared.lock();
    let updated = state
        .vaults
        .get_mut(&ctx.vault)
        .and_then(|v| v.keys.get_mut(name))
        .and_then(|vs| vs.iter_mut().find(|k| k.version == target))
        .map(|k| {
            if let Some(enabled) = body["attributes"]["enabled"].as_bool() {
                k.enabled = enabled;
            }
            k.updated = crypto::now();
            k.clone()
        });
    let _ = state.save();
    drop(state);
    match updated {
        Some(k) => Json(key_bundle(ctx, name, &k)).into_response(),
        None => key_not_found(name, &ctx.vault),
    }
}

fn delete_key(ctx: &Ctx, name: &str) -> Response {
    if let Err(r) = ctx.check(&format!("keys/{name}"), Action::KeyDelete) {
        return r;
    }
    let latest = match find_key(ctx, name, None) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let mut state = ctx.shared.lock();
    if let Some(v) = state.vaults.get_mut(&ctx.vault) {
        v.keys.remove(name);
    }
    let _ = state.save();
    drop(state);
    let mut bundle = key_bundle(ctx, name, &latest);
    let now = crypto::now();
    bundle["recoveryId"] = json!(format!("{}/deletedkeys/{name}", ctx.vault_url));
    bundle["deletedDate"] = json!(now);
    bundle["scheduledPurgeDate"] = json!(now + 90 * 86_400);
    Json(bundle).into_response()
}

fn key_operation(ctx: &Ctx, name: &str, version: Option<&str>, op: &str, body: &Value) -> Response {
    let action = match op {
        "wrapkey" => Action::KeyWrap,
        "unwrapkey" => Action::KeyUnwrap,
        "encrypt" => Action::KeyEncrypt,
        _ => Action::KeyDecrypt,
    };
    if let Err(r) = ctx.check(&format!("keys/{name}"), action) {
        return r;
    }
    let key = match find_key(ctx, name, version) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if !key.enabled {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "Operation {} is not allowed on a disabled key.",
                op_name(op)
            ),
            Some("KeyDisabled"),
        );
    }
    let alg = body["alg"].as_str().unwrap_or_default();
    let Some(value) = body["value"].as_str().and_then(crypto::b64url_decode) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "Property 'value' is required and must be base64url.",
            None,
        );
    };
    let material = crypto::b64_decode(&key.material).unwrap_or_default();
    let forward = matches!(op, "wrapkey" | "encrypt");
    let result = match (key.kty.as_str(), alg) {
        ("RSA", "RSA-OAEP" | "RSA-OAEP-256") if forward => {
            crypto::rsa_encrypt(&material, alg, &value)
        }
        ("RSA", "RSA-OAEP" | "RSA-OAEP-256") => crypto::rsa_decrypt(&material, alg, &value),
        ("oct-HSM", "A256KW") if op == "wrapkey" => crypto::aes_kw_wrap(&material, &value),
        ("oct-HSM", "A256KW") if op == "unwrapkey" => crypto::aes_kw_unwrap(&material, &value),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                &format!(
                    "Algorithm '{alg}' is not supported for a {} key and operation {}; RSA keys take RSA-OAEP and RSA-OAEP-256, oct-HSM keys A256KW for wrapKey/unwrapKey.",
                    key.kty,
                    op_name(op)
                ),
                None,
            );
        }
    };
    match result {
        Ok(out) => Json(json!({"kid": format!("{}/keys/{name}/{}", ctx.vault_url, key.version), "value": crypto::b64url(&out)})).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, "BadParameter", &e, None),
    }
}

fn op_name(op: &str) -> &'static str {
    match op {
        "wrapkey" => "wrapKey",
        "unwrapkey" => "unwrapKey",
        "encrypt" => "encrypt",
        _ => "decrypt",
    }
}

fn secret_bundle(ctx: &Ctx, name: &str, s: &SecretVersion) -> Value {
    let mut b = json!({
        "value": s.value,
        "id": format!("{}/secrets/{name}/{}", ctx.vault_url, s.version),
        "attributes": {"enabled": s.enabled, "created": s.created, "updated": s.updated, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
        "tags": {},
    });
    if let Some(ct) = &s.content_type {
        b["contentType"] = json!(ct);
    }
    b
}

fn set_secret(ctx: &Ctx, name: &str, body: &Value) -> Response {
    if let Err(r) = ctx.check(&format!("secrets/{name}"), Action::SecretSet) {
        return r;
    }
    let Some(value) = body["value"].as_str() else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "Property 'value' is required.",
            None,
        );
    };
    let content_type = body["contentType"].as_str().map(str::to_string);
    let mut state = ctx.shared.lock();
    match state.set_secret(&ctx.vault, name, value, content_type) {
        Ok(s) => {
            let _ = state.save();
            drop(state);
            Json(secret_bundle(ctx, name, &s)).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, "BadParameter", &e, None),
    }
}

fn get_secret(ctx: &Ctx, name: &str, version: Option<&str>) -> Response {
    if let Err(r) = ctx.check(&format!("secrets/{name}"), Action::SecretGet) {
        return r;
    }
    let state = ctx.shared.lock();
    let found = state
        .vaults
        .get(&ctx.vault)
        .and_then(|v| v.secrets.get(name))
        .and_then(|vs| match version {
            None => vs.last(),
            Some(ver) => vs.iter().find(|s| s.version == ver),
        })
        .cloned();
    drop(state);
    match found {
        Some(s) if !s.enabled => error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation get is not allowed on a disabled secret.",
            Some("SecretDisabled"),
        ),
        Some(s) => Json(secret_bundle(ctx, name, &s)).into_response(),
        None => secret_not_found(name),
    }
}

fn delete_secret(ctx: &Ctx, name: &str) -> Response {
    if let Err(r) = ctx.check(&format!("secrets/{name}"), Action::SecretDelete) {
        return r;
    }
    let mut state = ctx.shared.lock();
    let removed = state
        .vaults
        .get_mut(&ctx.vault)
        .and_then(|v| v.secrets.remove(name));
    let _ = state.save();
    drop(state);
    match removed.and_then(|vs| vs.last().cloned()) {
        Some(s) => {
            let mut b = secret_bundle(ctx, name, &s);
            b.as_object_mut().map(|o| o.remove("value"));
            b["recoveryId"] = json!(format!("{}/deletedsecrets/{name}", ctx.vault_url));
            b["deletedDate"] = json!(crypto::now());
            Json(b).into_response()
        }
        None => secret_not_found(name),
    }
}

#[cfg(test)]
mod tests {
    use super::api_version_ok;

    #[test]
    fn api_versions() {
        for ok in [
            "7.4",
            "7.5",
            "7.6",
            "7.6-preview.2",
            "2025-07-01",
            "2025-06-01-preview",
        ] {
            assert!(api_version_ok(ok), "{ok}");
        }
        for bad in ["", "7", "7.", "8.0", "latest", "2025-7-1"] {
            assert!(!api_version_ok(bad), "{bad}");
        }
    }
}
