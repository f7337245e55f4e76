//! The pod's identity: its service-account token (from NodePublishVolume `secrets` first, then
//! `volume_context`), and the exchange of that token at Entra ID for a Key Vault access token
//! (the client-assertion flow, through azure_identity's ClientAssertionCredential).
//!
//! Access tokens are cached per (tenant, client id, namespace, service account, pod token):
//! one exchange per identity per token lifetime, and a token for one service account never
//! serves another. Keying on the pod token itself (a digest of it) also means a forged token
//! that merely claims a cached service account goes to Entra, and is refused there.

mod kube;
mod token;

pub(crate) use kube::KubeApi;
pub(crate) use token::{PodToken, TOKENS_KEY};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{AccessToken, TokenCredential};
use azure_core::http::{ClientMethodOptions, ClientOptions};
use azure_core::time::OffsetDateTime;
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
};

/// The scope of a Key Vault access token.
pub(crate) const KEYVAULT_SCOPE: &str = "https://vault.azure.net/.default";
/// A cached token is used until this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    #[error(
        "no service-account token for audience {0:?} in the request (is tokenRequests set on the CSIDriver?)"
    )]
    NoToken(String),
    #[error("the service-account token is malformed: {0}")]
    Malformed(String),
    #[error("Entra ID refused the pod's token: {0}")]
    Refused(String),
    #[error("Entra ID is unavailable: {0}")]
    Unavailable(String),
    #[error("the Kubernetes API is unavailable: {0}")]
    ApiUnavailable(String),
    #[error(
        "no client id for this volume: set the clientID parameter, or annotate the ServiceAccount with azure.workload.identity/client-id (read when the driver runs in a cluster)"
    )]
    NoClientId,
    #[error("no tenant id for this volume: set the tenantID parameter or --tenant-id")]
    NoTenantId,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    tenant: String,
    client_id: String,
    namespace: String,
    service_account: String,
    token_digest: [u8; 32],
}

/// The pod's token as the credential's client assertion, straight from memory.
#[derive(Debug)]
struct Assertion(PodToken);

#[async_trait::async_trait]
impl ClientAssertion for Assertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        Ok(self.0.jwt().to_string())
    }
}

/// Exchanges pod tokens for Key Vault access tokens, with a cache.
pub(crate) struct Entra {
    authority_host: String,
    options: ClientOptions,
    cache: Mutex<HashMap<CacheKey, AccessToken>>,
}

impl Entra {
    pub(crate) fn new(authority_host: &str, options: ClientOptions) -> Entra {
        Entra {
            authority_host: authority_host.trim_end_matches('/').to_string(),
            options,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A Key Vault access token for `pod` acting as `client_id` in `tenant`; from the cache
    /// when a valid one is there.
    pub(crate) async fn access_token(
        &self,
        tenant: &str,
        client_id: &str,
        pod: &PodToken,
    ) -> Result<AccessToken, IdentityError> {
        self.exchange(tenant, client_id, pod, true).await
    }

    /// A new exchange, whatever the cache holds (and the cache refreshed): re-authorization
    /// must notice a federated credential deleted since the cached token was issued.
    pub(crate) async fn fresh_access_token(
        &self,
        tenant: &str,
        client_id: &str,
        pod: &PodToken,
    ) -> Result<AccessToken, IdentityError> {
        self.exchange(tenant, client_id, pod, false).await
    }

    async fn exchange(
        &self,
        tenant: &str,
        client_id: &str,
        pod: &PodToken,
        use_cache: bool,
    ) -> Result<AccessToken, IdentityError> {
        pod.check_time()?;
        let key = CacheKey {
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
            namespace: pod.namespace().to_string(),
            service_account: pod.service_account().to_string(),
            token_digest: pod.digest(),
        };
        let now = OffsetDateTime::now_utc();
        if let Some(hit) = self.lock().get(&key).filter(|_| use_cache)
            && hit.expires_on - EXPIRY_MARGIN > now
        {
            crate::metrics::metrics().cache_lookup(true);
            return Ok(hit.clone());
        }
        crate::metrics::metrics().cache_lookup(false);
        let started = std::time::Instant::now();
        let mut options = self.options.clone();
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = self.authority_host.clone();
        options.cloud = Some(Arc::new(CloudConfiguration::from(cloud)));
        let credential = ClientAssertionCredential::new(
            tenant.to_string(),
            client_id.to_string(),
            Assertion(pod.clone()),
            Some(ClientAssertionCredentialOptions {
                client_options: options,
            }),
        )
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        let token = credential
            .get_token(&[KEYVAULT_SCOPE], None)
            .await
            .map_err(classify);
        let outcome = match &token {
            Ok(_) => "ok",
            Err(IdentityError::Refused(_)) => "refused",
            Err(_) => "unavailable",
        };
        crate::metrics::metrics().azure_call("entra.token", outcome, started.elapsed());
        let token = token?;
        let mut cache = self.lock();
        cache.retain(|_, t| t.expires_on > now);
        cache.insert(key, token.clone());
        Ok(token)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, AccessToken>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Entra's refusals (an AADSTS code, HTTP 400/401) are the pod's problem; everything else
/// (connection failures, 429, 5xx after retries) is the service's.
fn classify(e: azure_core::Error) -> IdentityError {
    let text = first_line(&e.to_string());
    let status = e.http_status().map(u16::from);
    if text.contains("AADSTS") || matches!(status, Some(400) | Some(401)) {
        IdentityError::Refused(aadsts_summary(&text))
    } else {
        // With the root cause: "retry policy expired" alone tells an operator nothing.
        IdentityError::Unavailable(crate::error_text::with_causes(&e))
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(400)
        .collect()
}

/// "AADSTS70021: No matching federated identity record ..." out of the SDK's message.
fn aadsts_summary(text: &str) -> String {
    match text.find("AADSTS") {
        Some(i) => text[i..]
            .split(" Trace ID")
            .next()
            .unwrap_or_default()
            .trim_end_matches(['\'', '"', '.'])
            .to_string(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_codes_are_kept_and_noise_dropped() {
        let msg = "WorkloadIdentityCredential authentication failed. AADSTS70021: No matching federated identity record found for presented assertion. Trace ID: abc Correlation ID: def";
        assert_eq!(
            aadsts_summary(msg),
            "AADSTS70021: No matching federated identity record found for presented assertion"
        );
    }
}
