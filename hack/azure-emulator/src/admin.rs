//! The control plane for tests, under `/_emulator/`, served only with `--admin`: identities,
//! federated credentials, role assignments, keys and issuers; service-account tokens from the
//! fake issuers; injected faults; the per-route call counters; the request records; and the
//! role-assignment propagation delay.
//! Nothing here exists in Azure.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::config::{FederatedCredential, Identity, KeySpec, RoleAssignment};
use crate::faults::{Fault, FaultSpec};
use crate::issuer::{self, TokenRequest};
use crate::rbac;
use crate::server::Shared;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_emulator/identities", post(add_identity))
        .route("/_emulator/identities/{client_id}", delete(remove_identity))
        .route(
            "/_emulator/identities/{client_id}/federated-credentials",
            post(add_fic),
        )
        .route(
            "/_emulator/identities/{client_id}/federated-credentials/{name}",
            delete(remove_fic),
        )
        .route(
            "/_emulator/role-assignments",
            post(add_role).delete(remove_role),
        )
        .route("/_emulator/vaults/{vault}/keys", post(add_key))
        .route("/_emulator/hsms/{vault}/keys", post(add_key))
        .route("/_emulator/issuers/{name}", post(add_issuer))
        .route("/_emulator/issuers/{name}/token", post(mint_token))
        .route("/_emulator/faults", post(add_fault).delete(clear_faults))
        .route("/_emulator/counters", get(counters).delete(reset_counters))
        .route("/_emulator/records", get(records).delete(clear_records))
        .route("/_emulator/propagation-delay", put(set_delay))
}

fn disabled(shared: &Shared) -> Option<Response> {
    (!shared.admin).then(|| {
        (
            StatusCode::NOT_FOUND,
            "the control plane is off (start with --admin)",
        )
            .into_response()
    })
}

fn bad(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

fn done(shared: &Shared) -> Response {
    match shared.lock().save() {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

#[derive(Deserialize)]
struct NewIdentity {
    tenant: String,
    #[serde(flatten)]
    identity: Identity,
}

async fn add_identity(State(s): State<Arc<Shared>>, Json(req): Json<NewIdentity>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    s.lock().add_identity(&req.tenant, req.identity);
    done(&s)
}

async fn remove_identity(State(s): State<Arc<Shared>>, Path(client_id): Path<String>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if !s.lock().remove_identity(&client_id) {
        return StatusCode::NOT_FOUND.into_response();
    }
    done(&s)
}

async fn add_fic(
    State(s): State<Arc<Shared>>,
    Path(client_id): Path<String>,
    Json(fc): Json<FederatedCredential>,
) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if !s.lock().add_federated_credential(&client_id, fc) {
        return StatusCode::NOT_FOUND.into_response();
    }
    done(&s)
}

async fn remove_fic(
    State(s): State<Arc<Shared>>,
    Path((client_id, name)): Path<(String, String)>,
) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if !s.lock().remove_federated_credential(&client_id, &name) {
        return StatusCode::NOT_FOUND.into_response();
    }
    done(&s)
}

async fn add_role(State(s): State<Arc<Shared>>, Json(ra): Json<RoleAssignment>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if let Err(e) = rbac::validate(&ra) {
        return bad(e);
    }
    s.lock().change_role(ra, true);
    done(&s)
}

async fn remove_role(State(s): State<Arc<Shared>>, Json(ra): Json<RoleAssignment>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if !s.lock().change_role(ra, false) {
        return StatusCode::NOT_FOUND.into_response();
    }
    done(&s)
}

async fn add_key(
    State(s): State<Arc<Shared>>,
    Path(vault): Path<String>,
    Json(spec): Json<KeySpec>,
) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    let created = s.lock().create_key(&vault, &spec);
    match created {
        Ok(v) => {
            let _ = s.lock().save();
            Json(json!({"version": v.version})).into_response()
        }
        Err(e) => bad(e),
    }
}

async fn add_issuer(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    let added = s.lock().add_issuer(&name);
    match added {
        Ok(_) => Json(json!({"issuer": format!("{}/issuers/{name}", s.base_url)})).into_response(),
        Err(e) => bad(e),
    }
}

async fn mint_token(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    Json(req): Json<TokenRequest>,
) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    match issuer::mint(&s, &name, &req) {
        Ok(token) => Json(json!({"token": token})).into_response(),
        Err(e) => bad(e),
    }
}

async fn add_fault(State(s): State<Arc<Shared>>, Json(spec): Json<FaultSpec>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if let Ok(mut f) = s.faults.lock() {
        f.push(Fault::from(spec));
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_faults(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if let Ok(mut f) = s.faults.lock() {
        f.clear();
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn counters(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    let c = s.counters.lock().map(|c| c.clone()).unwrap_or_default();
    Json(c).into_response()
}

async fn reset_counters(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    if let Ok(mut c) = s.counters.lock() {
        c.clear();
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn records(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    Json(s.records.all()).into_response()
}

async fn clear_records(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    s.records.clear();
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct Delay {
    ms: u64,
}

async fn set_delay(State(s): State<Arc<Shared>>, Json(d): Json<Delay>) -> Response {
    if let Some(r) = disabled(&s) {
        return r;
    }
    s.lock().propagation_delay = std::time::Duration::from_millis(d.ms);
    StatusCode::NO_CONTENT.into_response()
}
