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

pub(crate) use kube::{KubeApi, path_segment};
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

/// Entra's definitive refusals of a client assertion (AADSTS codes): the pod's identity is not
/// (or no longer) allowed, and asking again will not change that. Every other answer (429,
/// 5xx, `temporarily_unavailable`, transient codes such as 90033 and 90006, codes not listed
/// here, no connection) is treated as Entra's trouble, not the pod's. docs/operations.md has
/// the table.
pub(crate) const DEFINITIVE_AADSTS: &[u32] = &[
    50013,   // InvalidAssertion: expired, malformed, or issuer and API mismatch
    50027,   // InvalidJwtToken
    70011,   // InvalidScope
    70021,   // no matching federated identity record
    700016,  // application not found in the tenant
    700024,  // client assertion not within its valid time range
    700027,  // client assertion failed signature validation
    700211,  // no matching federated identity record for the issuer
    700212,  // ... for the audience
    700213,  // ... for the subject
    7000112, // application disabled
    7000272, // signing key not in the issuer's JWKS
    90002,   // tenant not found
    900023,  // tenant identifier not valid
    500011,  // resource principal not found (invalid_resource)
];
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
    scope: String,
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

    /// An access token for `scope` (a vault's resource) for `pod` acting as `client_id` in
    /// `tenant`; from the cache when a valid one is there.
    pub(crate) async fn access_token(
        &self,
        tenant: &str,
        client_id: &str,
        pod: &PodToken,
        scope: &str,
    ) -> Result<AccessToken, IdentityError> {
        self.exchange(tenant, client_id, pod, scope, true).await
    }

    /// A new exchange, whatever the cache holds (and the cache refreshed): re-authorization
    /// must notice a federated credential deleted since the cached token was issued.
    pub(crate) async fn fresh_access_token(
        &self,
        tenant: &str,
        client_id: &str,
        pod: &PodToken,
        scope: &str,
    ) -> Result<AccessToken, IdentityError> {
        self.exchange(tenant, client_id, pod, scope, false).await
    }

    async fn exchange(
        &self,
        tenant: &str,
        client_id: &str,
        pod: &PodToken,
        scope: &str,
        use_cache: bool,
    ) -> Result<AccessToken, IdentityError> {
        pod.check_time()?;
        let key = CacheKey {
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
            namespace: pod.namespace().to_string(),
            service_account: pod.service_account().to_string(),
            token_digest: pod.digest(),
            scope: scope.to_string(),
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
        let token = credential.get_token(&[scope], None).await.map_err(classify);
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

/// A definitive refusal (one of `DEFINITIVE_AADSTS`, on a 4xx) is the pod's problem;
/// everything else is Entra's, and transient.
pub(crate) fn classify(e: azure_core::Error) -> IdentityError {
    let text = first_line(&e.to_string());
    let status = e.http_status().map(u16::from);
    let code = aadsts_code(&text);
    let client_error = status.is_none_or(|s| (400..500).contains(&s) && s != 408 && s != 429);
    match code {
        Some(c) if client_error && DEFINITIVE_AADSTS.contains(&c) => {
            IdentityError::Refused(aadsts_summary(&text))
        }
        // The whole chain of causes: "retry policy expired" alone does not say that the
        // certificate was refused or the connection was.
        _ => IdentityError::Unavailable(match code {
            Some(_) => aadsts_summary(&text),
            None => crate::error_text::with_causes(&e),
        }),
    }
}

/// The number of the first "AADSTSnnnn" in `text`.
fn aadsts_code(text: &str) -> Option<u32> {
    let i = text.find("AADSTS")?;
    let digits: String = text[i + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
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

    /// docs/operations.md's table of Entra refusals lists exactly the codes that lock.
    #[test]
    fn the_operators_aadsts_table_is_the_classification() {
        let doc = include_str!("../../docs/operations.md");
        let table = doc
            .split("## Entra ID refusals")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/operations.md has its AADSTS section");
        let mut documented: Vec<u32> = table
            .lines()
            .filter_map(|l| l.strip_prefix('|')?.split('|').next()?.trim().parse().ok())
            .collect();
        documented.sort_unstable();
        let mut classified = DEFINITIVE_AADSTS.to_vec();
        classified.sort_unstable();
        assert_eq!(documented, classified);
    }

    #[test]
    fn codes_decide_not_text() {
        assert_eq!(aadsts_code("x AADSTS700213: subject"), Some(700213));
        assert_eq!(aadsts_code("AADSTS"), None);
        assert_eq!(aadsts_code("no code"), None);
        let e = |status: u16, text: &str| {
            classify(azure_core::Error::with_message(
                azure_core::error::ErrorKind::HttpResponse {
                    status: status.into(),
                    error_code: None,
                    raw_response: None,
                },
                text.to_string(),
            ))
        };
        assert!(matches!(
            e(400, "AADSTS70021: No matching federated identity record"),
            IdentityError::Refused(_)
        ));
        assert!(matches!(
            e(401, "AADSTS7000272: key"),
            IdentityError::Refused(_)
        ));
        // Entra's transient codes carry AADSTS too.
        assert!(matches!(
            e(503, "AADSTS90033: transient error"),
            IdentityError::Unavailable(_)
        ));
        assert!(matches!(
            e(400, "AADSTS90006: retry"),
            IdentityError::Unavailable(_)
        ));
        assert!(matches!(
            e(429, "AADSTS70021: throttled"),
            IdentityError::Unavailable(_)
        ));
        assert!(matches!(
            e(400, "bad request without a code"),
            IdentityError::Unavailable(_)
        ));
    }

    #[test]
    fn aadsts_codes_are_kept_and_noise_dropped() {
        let msg = "WorkloadIdentityCredential authentication failed. AADSTS70021: No matching federated identity record found for presented assertion. Trace ID: abc Correlation ID: def";
        assert_eq!(
            aadsts_summary(msg),
            "AADSTS70021: No matching federated identity record found for presented assertion"
        );
    }
}
