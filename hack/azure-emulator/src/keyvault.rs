//! The Key Vault and Managed HSM data plane, several vaults and HSMs on one emulator chosen by
//! port: each has its own port on 127.0.0.1, so `https://127.0.0.1:PORT` is a vault (or HSM)
//! URL with nothing after it, as the SDKs' key and secret id parsers expect, and no DNS is
//! needed. A request without a bearer token gets the 401 challenge naming the tenant and the
//! service's resource (`https://vault.azure.net` or `https://managedhsm.azure.net`); a token is
//! checked (signature, audience, expiry, tenant) and the caller's roles decide. Keys keep
//! their attributes as Key Vault does (enabled, nbf/exp, key_ops), deleted keys and secrets are
//! kept (soft delete) until purged or recovered, and error bodies have Key Vault's shape.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::crypto;
use crate::entra::{KEYVAULT_RESOURCE, MANAGED_HSM_RESOURCE};
use crate::rbac::{self, Action};
use crate::records::AuthInfo;
use crate::server::{Caller, Endpoint, Service, Shared};
use crate::state::{KeyAttrs, KeyVersion, SecretVersion, StoreError, Vault};

pub fn routes() -> Router<Arc<Shared>> {
    let mut r = Router::new();
    for root in crate::server::DATA_PLANE_ROOTS {
        r = r
            .route(&format!("/{root}"), any(handle))
            .route(&format!("/{root}/{{*rest}}"), any(handle));
    }
    r
}

pub fn error(status: StatusCode, code: &str, message: &str, inner: Option<&str>) -> Response {
    let mut body = json!({"error": {"code": code, "message": message}});
    if let Some(inner) = inner {
        body["error"]["innererror"] = json!({"code": inner});
    }
    (status, Json(body)).into_response()
}

fn bad(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "BadParameter", message, None)
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::NotFound(m) => error(StatusCode::NOT_FOUND, "NotFound", &m, None),
        // https://learn.microsoft.com/azure/key-vault/general/soft-delete-overview: a deleted
        // name cannot be reused until it is purged or recovered.
        StoreError::Conflict(m) => error(
            StatusCode::CONFLICT,
            "Conflict",
            &m,
            Some("ObjectIsDeletedButRecoverable"),
        ),
        StoreError::BadParameter(m) => bad(&m),
        StoreError::Forbidden(m) => error(StatusCode::FORBIDDEN, "Forbidden", &m, None),
    }
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

/// Key and secret names: `^[0-9a-zA-Z-]{1,127}$`
/// (https://learn.microsoft.com/azure/key-vault/general/about-keys-secrets-certificates#objects-identifiers-and-versioning).
pub fn name_ok(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn check_name(name: &str) -> Result<(), Response> {
    if name_ok(name) {
        Ok(())
    } else {
        Err(bad(&format!(
            "The request URI contains an invalid name: {name}"
        )))
    }
}

struct Ctx<'a> {
    shared: &'a Shared,
    endpoint: Endpoint,
    url: String,
    oid: String,
    appid: String,
    api_version: String,
}

impl Ctx<'_> {
    fn check(&self, object: &str, action: Action) -> Result<(), Response> {
        let mut state = self.shared.lock();
        let roles = state.effective_roles();
        if rbac::allowed_in(
            roles,
            &self.oid,
            self.endpoint.service,
            &self.endpoint.name,
            object,
            action,
        ) {
            return Ok(());
        }
        let resource = match self.endpoint.service {
            Service::KeyVault => format!("/vaults/{}/{object}", self.endpoint.name),
            Service::ManagedHsm => format!("/{object}"),
        };
        Err(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid={};oid={}\r\nAction: '{}'\r\nResource: '{}'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\nVault: {};location=emulator\r\n",
                self.appid,
                self.oid,
                action.data_action_in(self.endpoint.service),
                resource,
                self.endpoint.name
            ),
            Some("ForbiddenByRbac"),
        ))
    }

    /// Reads the vault or HSM this request is for.
    fn read<R>(&self, f: impl FnOnce(&Vault) -> R) -> Option<R> {
        let state = self.shared.lock();
        let map = match self.endpoint.service {
            Service::KeyVault => &state.vaults,
            Service::ManagedHsm => &state.hsms,
        };
        map.get(&self.endpoint.name).map(f)
    }

    /// Changes the vault or HSM this request is for, and persists the state.
    fn write<R>(&self, f: impl FnOnce(&mut Vault) -> R) -> Option<R> {
        let mut state = self.shared.lock();
        let map = match self.endpoint.service {
            Service::KeyVault => &mut state.vaults,
            Service::ManagedHsm => &mut state.hsms,
        };
        let out = map.get_mut(&self.endpoint.name).map(f);
        let _ = state.save();
        out
    }

    fn key_not_found(&self, name: &str) -> Response {
        let what = match self.endpoint.service {
            Service::KeyVault => "key vault",
            Service::ManagedHsm => "managed HSM",
        };
        error(
            StatusCode::NOT_FOUND,
            "KeyNotFound",
            &format!(
                "A key with (name/id) {name} was not found in this {what}. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
            ),
            None,
        )
    }

    /// Pages a list the way Key Vault does: `maxresults` (1 to 25) per page, `nextLink` to the
    /// rest.
    fn page(
        &self,
        query: &HashMap<String, String>,
        path: &str,
        items: Vec<Value>,
    ) -> Result<Value, Response> {
        let max = match query.get("maxresults") {
            None => 25,
            Some(m) => match m.parse::<usize>() {
                Ok(n) if (1..=25).contains(&n) => n,
                _ => {
                    return Err(bad(&format!(
                        "Invalid maxresults value {m}: it must be between 1 and 25."
                    )));
                }
            },
        };
        let skip = query
            .get("$skiptoken")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        let end = skip.saturating_add(max).min(items.len());
        let value: Vec<Value> = items
            .get(skip..end)
            .map(<[Value]>::to_vec)
            .unwrap_or_default();
        let next = (end < items.len()).then(|| {
            format!(
                "{}{path}?api-version={}&$skiptoken={end}&maxresults={max}",
                self.url, self.api_version
            )
        });
        Ok(json!({"value": value, "nextLink": next}))
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    State(shared): State<Arc<Shared>>,
    endpoint: Option<Extension<Endpoint>>,
    uri: Uri,
    method: Method,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(Extension(endpoint)) = endpoint else {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        return error(
            StatusCode::NOT_FOUND,
            "VaultNotFound",
            &format!("No vault listens at {host}; each vault and Managed HSM has its own port."),
            None,
        );
    };
    let tenant = {
        let state = shared.lock();
        let map = match endpoint.service {
            Service::KeyVault => &state.vaults,
            Service::ManagedHsm => &state.hsms,
        };
        match map.get(&endpoint.name) {
            Some(v) => v.tenant.clone(),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "VaultNotFound",
                    &format!("{} does not exist on this emulator.", endpoint.name),
                    None,
                );
            }
        }
    };
    let api_version = match query.get("api-version") {
        None => {
            return bad("The 'api-version' query parameter is missing.");
        }
        Some(v) if !api_version_ok(v) => {
            return bad(&format!(
                "The specified version ({v}) is not recognized. Consider using the latest supported version (7.6)."
            ));
        }
        Some(v) => v.clone(),
    };
    let claims = match authenticate(&shared, endpoint.service, &tenant, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let ctx = Ctx {
        shared: &shared,
        url: shared.endpoint_url(&endpoint),
        endpoint,
        oid: claims["oid"].as_str().unwrap_or_default().to_string(),
        appid: claims["appid"].as_str().unwrap_or_default().to_string(),
        api_version,
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return bad(&format!("The request body is not valid JSON: {e}"));
            }
        }
    };
    let path = uri.path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut response = match dispatch(&ctx, method.as_str(), &segs, &query, &body) {
        Ok(r) | Err(r) => r,
    };
    response.extensions_mut().insert(Caller(ctx.oid.clone()));
    response.extensions_mut().insert(AuthInfo {
        object_id: ctx.oid.clone(),
        client_id: ctx.appid.clone(),
        tenant: claims["tid"].as_str().unwrap_or_default().to_string(),
    });
    response
}

const KEY_OPERATIONS: &[&str] = &[
    "wrapkey",
    "unwrapkey",
    "encrypt",
    "decrypt",
    "sign",
    "verify",
];

fn dispatch(
    ctx: &Ctx,
    method: &str,
    segs: &[&str],
    query: &HashMap<String, String>,
    body: &Value,
) -> Result<Response, Response> {
    // The name a route carries is checked before anything else.
    if let [_, name, ..] = segs
        && !name.is_empty()
    {
        check_name(name)?;
    }
    let hsm = ctx.endpoint.service == Service::ManagedHsm;
    let version = |v: &str| (!v.is_empty()).then(|| v.to_string());
    Ok(match (method, segs) {
        ("GET", ["keys"] | ["keys", ""]) => list_keys(ctx, query)?,
        ("POST", ["keys", name, "create"]) => create_key(ctx, name, body)?,
        ("POST", ["keys", name, "rotate"]) => rotate_key(ctx, name)?,
        ("GET", ["keys", name, "versions"]) => list_key_versions(ctx, name, query)?,
        ("GET", ["keys", name] | ["keys", name, ""]) => get_key(ctx, name, None)?,
        ("GET", ["keys", name, v]) => get_key(ctx, name, version(v))?,
        ("PATCH", ["keys", name] | ["keys", name, ""]) => update_key(ctx, name, None, body)?,
        ("PATCH", ["keys", name, v]) => update_key(ctx, name, version(v), body)?,
        ("DELETE", ["keys", name]) => delete_key(ctx, name)?,
        ("POST", ["keys", name, v, op]) if KEY_OPERATIONS.contains(op) => {
            key_operation(ctx, name, version(v), op, body)?
        }
        ("POST", ["keys", name, op]) if KEY_OPERATIONS.contains(op) => {
            key_operation(ctx, name, None, op, body)?
        }
        ("GET", ["deletedkeys"] | ["deletedkeys", ""]) => list_deleted_keys(ctx, query)?,
        ("GET", ["deletedkeys", name]) => get_deleted_key(ctx, name)?,
        ("DELETE", ["deletedkeys", name]) => purge_key(ctx, name)?,
        ("POST", ["deletedkeys", name, "recover"]) => recover_key(ctx, name)?,
        (_, ["secrets" | "deletedsecrets", ..]) if hsm => {
            return Err(bad("A Managed HSM has no secrets."));
        }
        ("GET", ["secrets"] | ["secrets", ""]) => list_secrets(ctx, query)?,
        ("PUT", ["secrets", name]) => set_secret(ctx, name, body)?,
        ("GET", ["secrets", name, "versions"]) => list_secret_versions(ctx, name, query)?,
        ("GET", ["secrets", name] | ["secrets", name, ""]) => get_secret(ctx, name, None)?,
        ("GET", ["secrets", name, v]) => get_secret(ctx, name, version(v))?,
        ("PATCH", ["secrets", name] | ["secrets", name, ""]) => {
            update_secret(ctx, name, None, body)?
        }
        ("PATCH", ["secrets", name, v]) => update_secret(ctx, name, version(v), body)?,
        ("DELETE", ["secrets", name]) => delete_secret(ctx, name)?,
        ("GET", ["deletedsecrets"] | ["deletedsecrets", ""]) => list_deleted_secrets(ctx, query)?,
        ("GET", ["deletedsecrets", name]) => get_deleted_secret(ctx, name)?,
        ("DELETE", ["deletedsecrets", name]) => purge_secret(ctx, name)?,
        ("POST", ["deletedsecrets", name, "recover"]) => recover_secret(ctx, name)?,
        _ => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "{method} /{} is not an operation this emulator serves.",
                segs.join("/")
            ),
            None,
        ),
    })
}

fn challenge(shared: &Shared, service: Service, tenant: &str, message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "Unauthorized", message, None);
    let resource = resource_of(service);
    let value = format!(
        "Bearer authorization=\"{}/{tenant}\", resource=\"{resource}\"",
        shared.base_url
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().insert("www-authenticate", v);
    }
    r
}

/// The audience a service's access tokens carry.
pub fn resource_of(service: Service) -> &'static str {
    match service {
        Service::KeyVault => KEYVAULT_RESOURCE,
        Service::ManagedHsm => MANAGED_HSM_RESOURCE,
    }
}

fn authenticate(
    shared: &Shared,
    service: Service,
    tenant: &str,
    headers: &HeaderMap,
) -> Result<Value, Response> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return Err(challenge(
            shared,
            service,
            tenant,
            "AKV10000: Request is missing a Bearer or PoP token.",
        ));
    };
    let claims: Value = shared.token_key.verify(token, 0).map_err(|e| {
        challenge(
            shared,
            service,
            tenant,
            &format!("AKV10032: Invalid token: {e}."),
        )
    })?;
    let resource = resource_of(service);
    let aud = claims["aud"].as_str().unwrap_or_default();
    // A Key Vault token does not open a Managed HSM, nor the reverse.
    if aud.trim_end_matches('/') != resource {
        return Err(challenge(
            shared,
            service,
            tenant,
            &format!("AKV10022: Invalid audience. Expected {resource}, found: {aud}."),
        ));
    }
    let v1 = format!("https://sts.windows.net/{tenant}/");
    let v2 = format!("{}/{tenant}/v2.0", shared.base_url);
    let iss = claims["iss"].as_str().unwrap_or_default();
    if claims["tid"].as_str() != Some(tenant) || (iss != v1 && iss != v2) {
        return Err(challenge(
            shared,
            service,
            tenant,
            &format!("AKV10032: Invalid issuer. Expected one of {v1}, {v2}, found: {iss}."),
        ));
    }
    Ok(claims)
}

fn attributes(
    store: &Vault,
    enabled: bool,
    created: u64,
    updated: u64,
    nbf: Option<u64>,
    exp: Option<u64>,
) -> Value {
    let mut a = json!({
        "enabled": enabled,
        "created": created,
        "updated": updated,
        "recoveryLevel": store.recovery_level(),
        "recoverableDays": store.retention_days,
    });
    if let Some(n) = nbf {
        a["nbf"] = json!(n);
    }
    if let Some(e) = exp {
        a["exp"] = json!(e);
    }
    a
}

fn key_attributes(store: &Vault, v: &KeyVersion) -> Value {
    let mut a = attributes(store, v.enabled, v.created, v.updated, v.nbf, v.exp);
    a["exportable"] = json!(false);
    a
}

fn key_bundle(ctx: &Ctx, store: &Vault, name: &str, v: &KeyVersion) -> Value {
    let kid = format!("{}/keys/{name}/{}", ctx.url, v.version);
    let mut key = json!({"kid": kid, "kty": v.kty, "key_ops": v.ops()});
    if v.is_rsa() {
        let material = crypto::b64_decode(&v.material).unwrap_or_default();
        let (n, e) = crypto::rsa_public(&material).unwrap_or_default();
        key["n"] = json!(crypto::b64url(&n));
        key["e"] = json!(crypto::b64url(&e));
    }
    json!({
        "key": key,
        "attributes": key_attributes(store, v),
        "tags": v.tags,
    })
}

fn deleted_fields(b: &mut Value, recovery_id: String, deleted: u64, purge: u64) {
    b["recoveryId"] = json!(recovery_id);
    b["deletedDate"] = json!(deleted);
    b["scheduledPurgeDate"] = json!(purge);
}

/// The named version, or the latest.
fn find_key(ctx: &Ctx, name: &str, version: Option<&str>) -> Result<(Vault, KeyVersion), Response> {
    let found = ctx.read(|store| {
        let versions = store.keys.get(name)?;
        let v = match version {
            None => versions.last(),
            Some(ver) => versions.iter().find(|k| k.version == ver),
        }?;
        Some((store.settings_only(), v.clone()))
    });
    found.flatten().ok_or_else(|| ctx.key_not_found(name))
}

fn tags_of(body: &Value) -> std::collections::BTreeMap<String, String> {
    body["tags"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn attrs_of(body: &Value) -> KeyAttrs {
    let a = &body["attributes"];
    KeyAttrs {
        enabled: a["enabled"].as_bool(),
        nbf: a["nbf"].as_u64(),
        exp: a["exp"].as_u64(),
        key_ops: body["key_ops"].as_array().map(|ops| {
            ops.iter()
                .filter_map(|o| o.as_str().map(str::to_string))
                .collect()
        }),
        tags: tags_of(body),
    }
}

fn create_key(ctx: &Ctx, name: &str, body: &Value) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyCreate)?;
    let Some(kty) = body["kty"].as_str() else {
        return Err(bad("Property 'kty' is required."));
    };
    let size = body["key_size"].as_u64().map(|s| s as u32);
    let attrs = attrs_of(body);
    let made = ctx
        .write(|store| {
            store
                .new_key_version(name, kty, size, attrs)
                .map(|v| key_bundle(ctx, store, name, &v))
        })
        .ok_or_else(|| ctx.key_not_found(name))?;
    made.map(|b| Json(b).into_response()).map_err(store_error)
}

fn rotate_key(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyRotate)?;
    let made = ctx
        .write(|store| {
            store
                .rotate_key(name)
                .map(|v| key_bundle(ctx, store, name, &v))
        })
        .ok_or_else(|| ctx.key_not_found(name))?;
    match made {
        Ok(b) => Ok(Json(b).into_response()),
        Err(StoreError::NotFound(_)) => Err(ctx.key_not_found(name)),
        Err(e) => Err(store_error(e)),
    }
}

fn get_key(ctx: &Ctx, name: &str, version: Option<String>) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyRead)?;
    let (store, k) = find_key(ctx, name, version.as_deref())?;
    Ok(Json(key_bundle(ctx, &store, name, &k)).into_response())
}

fn list_keys(ctx: &Ctx, query: &HashMap<String, String>) -> Result<Response, Response> {
    ctx.check("keys", Action::KeyRead)?;
    let items = ctx
        .read(|store| {
            store
                .keys
                .iter()
                .filter_map(|(name, vs)| {
                    let v = vs.last()?;
                    Some(json!({
                        "kid": format!("{}/keys/{name}", ctx.url),
                        "attributes": key_attributes(store, v),
                        "tags": v.tags,
                    }))
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Ok(Json(ctx.page(query, "/keys", items)?).into_response())
}

fn list_key_versions(
    ctx: &Ctx,
    name: &str,
    query: &HashMap<String, String>,
) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyRead)?;
    let items = ctx
        .read(|store| {
            store.keys.get(name).map(|vs| {
                vs.iter()
                    .map(|v| {
                        json!({
                            "kid": format!("{}/keys/{name}/{}", ctx.url, v.version),
                            "attributes": key_attributes(store, v),
                            "tags": v.tags,
                        })
                    })
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .ok_or_else(|| ctx.key_not_found(name))?;
    Ok(Json(ctx.page(query, &format!("/keys/{name}/versions"), items)?).into_response())
}

fn update_key(
    ctx: &Ctx,
    name: &str,
    version: Option<String>,
    body: &Value,
) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyUpdate)?;
    let target = find_key(ctx, name, version.as_deref())?.1.version;
    let attrs = attrs_of(body);
    if let Some(ops) = &attrs.key_ops
        && let Some(bad_op) = ops
            .iter()
            .find(|o| !crate::state::KEY_OPS.contains(&o.as_str()))
    {
        return Err(bad(&format!("Invalid key operation '{bad_op}'.")));
    }
    let updated = ctx
        .write(|store| {
            let k = store
                .keys
                .get_mut(name)?
                .iter_mut()
                .find(|k| k.version == target)?;
            if let Some(enabled) = attrs.enabled {
                k.enabled = enabled;
            }
            if body["attributes"].get("nbf").is_some() {
                k.nbf = attrs.nbf;
            }
            if body["attributes"].get("exp").is_some() {
                k.exp = attrs.exp;
            }
            if attrs.key_ops.is_some() {
                k.key_ops = attrs.key_ops.clone();
            }
            if body.get("tags").is_some() {
                k.tags = attrs.tags.clone();
            }
            k.updated = crypto::now();
            let k = k.clone();
            Some(key_bundle(ctx, store, name, &k))
        })
        .flatten();
    updated
        .map(|b| Json(b).into_response())
        .ok_or_else(|| ctx.key_not_found(name))
}

/// Soft delete (https://learn.microsoft.com/azure/key-vault/general/soft-delete-overview).
fn delete_key(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyDelete)?;
    let bundle = ctx
        .write(|store| {
            let d = store.delete_key(name)?;
            let latest = d.versions.last()?.clone();
            let mut b = key_bundle(ctx, store, name, &latest);
            deleted_fields(
                &mut b,
                format!("{}/deletedkeys/{name}", ctx.url),
                d.deleted,
                d.scheduled_purge,
            );
            Some(b)
        })
        .flatten()
        .ok_or_else(|| ctx.key_not_found(name))?;
    Ok(Json(bundle).into_response())
}

fn deleted_key_bundle(ctx: &Ctx, store: &Vault, name: &str, full: bool) -> Option<Value> {
    let d = store.deleted_keys.get(name)?;
    let latest = d.versions.last()?;
    let mut b = if full {
        key_bundle(ctx, store, name, latest)
    } else {
        json!({
            "kid": format!("{}/keys/{name}", ctx.url),
            "attributes": key_attributes(store, latest),
            "tags": latest.tags,
        })
    };
    deleted_fields(
        &mut b,
        format!("{}/deletedkeys/{name}", ctx.url),
        d.deleted,
        d.scheduled_purge,
    );
    Some(b)
}

fn deleted_key_not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        &format!("Deleted Key not found: {name}"),
        None,
    )
}

fn list_deleted_keys(ctx: &Ctx, query: &HashMap<String, String>) -> Result<Response, Response> {
    ctx.check("keys", Action::KeyReadDeleted)?;
    let items = ctx
        .read(|store| {
            store
                .deleted_keys
                .keys()
                .filter_map(|n| deleted_key_bundle(ctx, store, n, false))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Ok(Json(ctx.page(query, "/deletedkeys", items)?).into_response())
}

fn get_deleted_key(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyReadDeleted)?;
    ctx.read(|store| deleted_key_bundle(ctx, store, name, true))
        .flatten()
        .map(|b| Json(b).into_response())
        .ok_or_else(|| deleted_key_not_found(name))
}

fn recover_key(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyRecover)?;
    ctx.write(|store| {
        let versions = store.recover_key(name)?;
        let latest = versions.last()?;
        Some(key_bundle(ctx, store, name, latest))
    })
    .flatten()
    .map(|b| Json(b).into_response())
    .ok_or_else(|| deleted_key_not_found(name))
}

fn purge_key(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("keys/{name}"), Action::KeyPurge)?;
    match ctx.write(|store| store.purge_key(name)) {
        Some(Ok(true)) => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(Ok(false)) | None => Err(deleted_key_not_found(name)),
        Some(Err(e)) => Err(store_error(e)),
    }
}

fn key_operation(
    ctx: &Ctx,
    name: &str,
    version: Option<String>,
    op: &str,
    body: &Value,
) -> Result<Response, Response> {
    let action = match op {
        "wrapkey" => Action::KeyWrap,
        "unwrapkey" => Action::KeyUnwrap,
        "encrypt" => Action::KeyEncrypt,
        "decrypt" => Action::KeyDecrypt,
        "sign" => Action::KeySign,
        _ => Action::KeyVerify,
    };
    ctx.check(&format!("keys/{name}"), action)?;
    let (_, key) = find_key(ctx, name, version.as_deref())?;
    let op = op_name(op);
    let forbidden = |message: String, inner: &str| {
        error(StatusCode::FORBIDDEN, "Forbidden", &message, Some(inner))
    };
    // A disabled key still wraps, encrypts and verifies; it refuses the private-key side
    // (observed on the live service: Azure/azure-sdk-for-python#45342).
    if !key.enabled && matches!(op, "unwrapKey" | "decrypt" | "sign") {
        return Err(forbidden(
            format!("Operation {op} is not allowed on a disabled key."),
            "KeyDisabled",
        ));
    }
    // key_ops given at creation are enforced (Azure/azure-sdk-for-net#11518).
    if !key.ops().iter().any(|o| o == op) {
        return Err(forbidden(
            format!("Operation {op} is not permitted on this key."),
            "KeyOperationForbidden",
        ));
    }
    // Outside nbf/exp a key refuses encrypt, wrap and sign, but still decrypts, unwraps and
    // verifies (https://learn.microsoft.com/azure/key-vault/keys/about-keys-details#key-attributes,
    // "Date-time controlled operations").
    if matches!(op, "wrapKey" | "encrypt" | "sign") {
        let now = crypto::now();
        if key.nbf.is_some_and(|nbf| now < nbf) {
            return Err(forbidden(
                format!("Operation {op} is not allowed on a key which is not yet valid."),
                "KeyNotYetValid",
            ));
        }
        if key.exp.is_some_and(|exp| now >= exp) {
            return Err(forbidden(
                format!("Operation {op} is not allowed on an expired key."),
                "KeyExpired",
            ));
        }
    }
    let alg = body["alg"].as_str().unwrap_or_default();
    let Some(value) = body["value"].as_str().and_then(crypto::b64url_decode) else {
        return Err(bad("Property 'value' is required and must be base64url."));
    };
    let material = crypto::b64_decode(&key.material).unwrap_or_default();
    let kid = format!("{}/keys/{name}/{}", ctx.url, key.version);
    let result = match (key.is_rsa(), alg, op) {
        (true, "RSA-OAEP" | "RSA-OAEP-256", "wrapKey" | "encrypt") => {
            crypto::rsa_encrypt(&material, alg, &value)
        }
        (true, "RSA-OAEP" | "RSA-OAEP-256", "unwrapKey" | "decrypt") => {
            crypto::rsa_decrypt(&material, alg, &value)
        }
        (true, _, "sign") if crypto::signature_alg_ok(alg) => {
            crypto::rsa_sign(&material, alg, &value)
        }
        (true, _, "verify") if crypto::signature_alg_ok(alg) => {
            let Some(digest) = body["digest"].as_str().and_then(crypto::b64url_decode) else {
                return Err(bad("Property 'digest' is required and must be base64url."));
            };
            return crypto::rsa_verify(&material, alg, &digest, &value)
                .map(|ok| Json(json!({"value": ok})).into_response())
                .map_err(|e| bad(&e));
        }
        (false, "A256KW", "wrapKey") => crypto::aes_kw_wrap(&material, &value),
        (false, "A256KW", "unwrapKey") => crypto::aes_kw_unwrap(&material, &value),
        _ => {
            return Err(bad(&format!(
                "Algorithm '{alg}' is not supported for a {} key and operation {op}; RSA keys take RSA-OAEP and RSA-OAEP-256 (and RS/PS 256/384/512 to sign), oct-HSM keys A256KW for wrapKey/unwrapKey.",
                key.kty
            )));
        }
    };
    result
        .map(|out| Json(json!({"kid": kid, "value": crypto::b64url(&out)})).into_response())
        .map_err(|e| bad(&e))
}

fn op_name(op: &str) -> &'static str {
    match op {
        "wrapkey" => "wrapKey",
        "unwrapkey" => "unwrapKey",
        "encrypt" => "encrypt",
        "decrypt" => "decrypt",
        "sign" => "sign",
        _ => "verify",
    }
}

fn secret_attributes(store: &Vault, s: &SecretVersion) -> Value {
    attributes(store, s.enabled, s.created, s.updated, s.nbf, s.exp)
}

fn secret_bundle(ctx: &Ctx, store: &Vault, name: &str, s: &SecretVersion, value: bool) -> Value {
    let mut b = json!({
        "id": format!("{}/secrets/{name}/{}", ctx.url, s.version),
        "attributes": secret_attributes(store, s),
        "tags": s.tags,
    });
    if value {
        b["value"] = json!(s.value);
    }
    if let Some(ct) = &s.content_type {
        b["contentType"] = json!(ct);
    }
    b
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

fn set_secret(ctx: &Ctx, name: &str, body: &Value) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretSet)?;
    let Some(value) = body["value"].as_str() else {
        return Err(bad("Property 'value' is required."));
    };
    let content_type = body["contentType"].as_str().map(str::to_string);
    let attrs = attrs_of(body);
    ctx.write(|store| {
        store
            .new_secret_version(name, value, content_type, attrs)
            .map(|s| secret_bundle(ctx, store, name, &s, true))
    })
    .ok_or_else(|| secret_not_found(name))?
    .map(|b| Json(b).into_response())
    .map_err(store_error)
}

fn get_secret(ctx: &Ctx, name: &str, version: Option<String>) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretGet)?;
    let found = ctx
        .read(|store| {
            let vs = store.secrets.get(name)?;
            let s = match &version {
                None => vs.last(),
                Some(ver) => vs.iter().find(|s| &s.version == ver),
            }?;
            Some((s.enabled, secret_bundle(ctx, store, name, s, true)))
        })
        .flatten();
    match found {
        // A secret's exp and nbf are informational: get still answers
        // (https://learn.microsoft.com/azure/key-vault/secrets/about-secrets); disabled refuses.
        Some((false, _)) => Err(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation get is not allowed on a disabled secret.",
            Some("SecretDisabled"),
        )),
        Some((true, b)) => Ok(Json(b).into_response()),
        None => Err(secret_not_found(name)),
    }
}

fn list_secrets(ctx: &Ctx, query: &HashMap<String, String>) -> Result<Response, Response> {
    ctx.check("secrets", Action::SecretRead)?;
    let items = ctx
        .read(|store| {
            store
                .secrets
                .iter()
                .filter_map(|(name, vs)| {
                    let s = vs.last()?;
                    let mut item = secret_bundle(ctx, store, name, s, false);
                    item["id"] = json!(format!("{}/secrets/{name}", ctx.url));
                    Some(item)
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Ok(Json(ctx.page(query, "/secrets", items)?).into_response())
}

fn list_secret_versions(
    ctx: &Ctx,
    name: &str,
    query: &HashMap<String, String>,
) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretRead)?;
    let items = ctx
        .read(|store| {
            store.secrets.get(name).map(|vs| {
                vs.iter()
                    .map(|s| secret_bundle(ctx, store, name, s, false))
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .ok_or_else(|| secret_not_found(name))?;
    Ok(Json(ctx.page(query, &format!("/secrets/{name}/versions"), items)?).into_response())
}

fn update_secret(
    ctx: &Ctx,
    name: &str,
    version: Option<String>,
    body: &Value,
) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretSet)?;
    let attrs = attrs_of(body);
    ctx.write(|store| {
        let vs = store.secrets.get_mut(name)?;
        let s = match &version {
            None => vs.last_mut(),
            Some(ver) => vs.iter_mut().find(|s| &s.version == ver),
        }?;
        if let Some(enabled) = attrs.enabled {
            s.enabled = enabled;
        }
        if body["attributes"].get("nbf").is_some() {
            s.nbf = attrs.nbf;
        }
        if body["attributes"].get("exp").is_some() {
            s.exp = attrs.exp;
        }
        if let Some(ct) = body.get("contentType") {
            s.content_type = ct.as_str().map(str::to_string);
        }
        if body.get("tags").is_some() {
            s.tags = attrs.tags.clone();
        }
        s.updated = crypto::now();
        let s = s.clone();
        Some(secret_bundle(ctx, store, name, &s, false))
    })
    .flatten()
    .map(|b| Json(b).into_response())
    .ok_or_else(|| secret_not_found(name))
}

fn delete_secret(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretDelete)?;
    ctx.write(|store| {
        let d = store.delete_secret(name)?;
        let latest = d.versions.last()?.clone();
        let mut b = secret_bundle(ctx, store, name, &latest, false);
        deleted_fields(
            &mut b,
            format!("{}/deletedsecrets/{name}", ctx.url),
            d.deleted,
            d.scheduled_purge,
        );
        Some(b)
    })
    .flatten()
    .map(|b| Json(b).into_response())
    .ok_or_else(|| secret_not_found(name))
}

fn deleted_secret_bundle(ctx: &Ctx, store: &Vault, name: &str) -> Option<Value> {
    let d = store.deleted_secrets.get(name)?;
    let latest = d.versions.last()?;
    let mut b = secret_bundle(ctx, store, name, latest, false);
    deleted_fields(
        &mut b,
        format!("{}/deletedsecrets/{name}", ctx.url),
        d.deleted,
        d.scheduled_purge,
    );
    Some(b)
}

fn deleted_secret_not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "SecretNotFound",
        &format!("Deleted Secret not found: {name}"),
        None,
    )
}

fn list_deleted_secrets(ctx: &Ctx, query: &HashMap<String, String>) -> Result<Response, Response> {
    ctx.check("secrets", Action::SecretRead)?;
    let items = ctx
        .read(|store| {
            store
                .deleted_secrets
                .keys()
                .filter_map(|n| {
                    let mut b = deleted_secret_bundle(ctx, store, n)?;
                    b["id"] = json!(format!("{}/secrets/{n}", ctx.url));
                    Some(b)
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Ok(Json(ctx.page(query, "/deletedsecrets", items)?).into_response())
}

fn get_deleted_secret(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretRead)?;
    ctx.read(|store| deleted_secret_bundle(ctx, store, name))
        .flatten()
        .map(|b| Json(b).into_response())
        .ok_or_else(|| deleted_secret_not_found(name))
}

fn recover_secret(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretRecover)?;
    ctx.write(|store| {
        let versions = store.recover_secret(name)?;
        let latest = versions.last()?;
        Some(secret_bundle(ctx, store, name, latest, false))
    })
    .flatten()
    .map(|b| Json(b).into_response())
    .ok_or_else(|| deleted_secret_not_found(name))
}

fn purge_secret(ctx: &Ctx, name: &str) -> Result<Response, Response> {
    ctx.check(&format!("secrets/{name}"), Action::SecretPurge)?;
    match ctx.write(|store| store.purge_secret(name)) {
        Some(Ok(true)) => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(Ok(false)) | None => Err(deleted_secret_not_found(name)),
        Some(Err(e)) => Err(store_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::{api_version_ok, name_ok};

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

    #[test]
    fn names() {
        assert!(name_ok("kek-2"));
        assert!(name_ok(&"a".repeat(127)));
        for bad in ["", "a_b", "a.b", "ä", &"a".repeat(128)] {
            assert!(!name_ok(bad), "{bad}");
        }
    }
}
