//! A fake Kubernetes service-account issuer: the OIDC discovery document and JWKS that
//! kube-apiserver publishes, and tokens shaped like its TokenRequest output, so tests can play
//! kubelet.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::crypto;
use crate::server::Shared;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/issuers/{name}/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/issuers/{name}/openid/v1/jwks", get(jwks))
}

async fn discovery(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if !shared.lock().issuers.contains_key(&name) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let issuer = format!("{}/issuers/{name}", shared.base_url);
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
    .into_response()
}

async fn jwks(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    match shared.lock().issuers.get(&name) {
        Some(key) => Json(json!({"keys": [key.jwk()]})).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// What a service-account token is minted for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    #[serde(default = "crate::config::default_audiences")]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// Lifetime in seconds (kubelet asks for 3600).
    #[serde(default = "default_ttl")]
    pub ttl_secs: i64,
    /// Shift of iat/nbf/exp in seconds, to mint tokens from the past or the future.
    #[serde(default)]
    pub offset_secs: i64,
}

fn default_ttl() -> i64 {
    3600
}

/// Mints a token signed by issuer `name`, as kube-apiserver's TokenRequest does.
pub fn mint(shared: &Shared, name: &str, req: &TokenRequest) -> Result<String, String> {
    let key = shared
        .lock()
        .issuers
        .get(name)
        .cloned()
        .ok_or_else(|| format!("no issuer {name}"))?;
    let now = crypto::now() as i64 + req.offset_secs;
    let mut k8s = json!({
        "namespace": req.namespace,
        "serviceaccount": {"name": req.service_account, "uid": crypto::random_guid()},
    });
    if let (Some(pod), Some(uid)) = (&req.pod_name, &req.pod_uid) {
        k8s["pod"] = json!({"name": pod, "uid": uid});
    }
    let claims = json!({
        "aud": req.audiences,
        "exp": now + req.ttl_secs,
        "iat": now,
        "nbf": now,
        "iss": format!("{}/issuers/{name}", shared.base_url),
        "jti": crypto::random_guid(),
        "kubernetes.io": k8s,
        "sub": format!("system:serviceaccount:{}:{}", req.namespace, req.service_account),
    });
    key.sign(&claims)
}
