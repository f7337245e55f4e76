//! The service-account token kubelet passes in NodePublishVolume: under
//! `csi.storage.k8s.io/serviceAccount.tokens`, a JSON map from audience to
//! `{"token": JWT, "expirationTimestamp": RFC3339}`; in `secrets` with Kubernetes 1.35's
//! `serviceAccountTokenInSecrets`, in `volume_context` before. The token is only parsed here
//! (its subject and expiry); Entra verifies it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

use super::IdentityError;

pub(crate) const TOKENS_KEY: &str = "csi.storage.k8s.io/serviceAccount.tokens";
const SUBJECT_PREFIX: &str = "system:serviceaccount:";
/// Tokens past their `exp` by more than this are refused before anyone is asked.
const SKEW_SECS: u64 = 60;
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A pod's token: never printed, zeroized when the last copy goes.
#[derive(Clone)]
pub(crate) struct PodToken {
    jwt: Arc<Zeroizing<String>>,
    namespace: String,
    service_account: String,
    expires_unix: u64,
}

impl fmt::Debug for PodToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodToken")
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .field("expires_unix", &self.expires_unix)
            .finish_non_exhaustive()
    }
}

impl PodToken {
    /// Takes the token for `audience` from `secrets`, else from `volume_context`, and checks
    /// that it names the pod's service account (when kubelet says which that is).
    pub(crate) fn from_request(
        secrets: &HashMap<String, String>,
        volume_context: &HashMap<String, String>,
        audience: &str,
    ) -> Result<PodToken, IdentityError> {
        let raw = secrets
            .get(TOKENS_KEY)
            .or_else(|| volume_context.get(TOKENS_KEY))
            .ok_or_else(|| IdentityError::NoToken(audience.to_string()))?;
        if raw.len() > MAX_TOKEN_BYTES {
            return Err(IdentityError::Malformed(format!(
                "{TOKENS_KEY} is larger than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        // The JSON is kubelet's request text, which lives in the request anyway; the token is
        // copied out into a zeroizing buffer.
        let map: serde_json::Value = serde_json::from_str(raw)
            .map_err(|_| IdentityError::Malformed(format!("{TOKENS_KEY} is not a JSON object")))?;
        let jwt = map
            .get(audience)
            .and_then(|entry| entry.get("token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| IdentityError::NoToken(audience.to_string()))?;
        let token = Self::parse(jwt)?;
        let pod_ns = volume_context.get("csi.storage.k8s.io/pod.namespace");
        let pod_sa = volume_context.get("csi.storage.k8s.io/serviceAccount.name");
        if pod_ns.is_some_and(|ns| *ns != token.namespace)
            || pod_sa.is_some_and(|sa| *sa != token.service_account)
        {
            return Err(IdentityError::Malformed(
                "the token's subject is not the publishing pod's service account".into(),
            ));
        }
        Ok(token)
    }

    /// Reads the subject and expiry of a JWT (unverified).
    pub(crate) fn parse(jwt: &str) -> Result<PodToken, IdentityError> {
        let malformed = |what: &str| IdentityError::Malformed(what.to_string());
        let mut parts = jwt.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not a JWT (three dot-separated parts)"));
        };
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .map_err(|_| malformed("payload is not base64url"))?,
        );
        let claims: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|_| malformed("payload is not JSON"))?;
        let sub = claims["sub"]
            .as_str()
            .ok_or_else(|| malformed("no sub claim"))?;
        let (namespace, service_account) = sub
            .strip_prefix(SUBJECT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
            .ok_or_else(|| malformed("sub is not system:serviceaccount:NAMESPACE:NAME"))?;
        let expires_unix = claims["exp"]
            .as_u64()
            .ok_or_else(|| malformed("no exp claim"))?;
        Ok(PodToken {
            jwt: Arc::new(Zeroizing::new(jwt.to_string())),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            expires_unix,
        })
    }

    /// Refuses a token that has expired (beyond a small skew).
    pub(crate) fn check_time(&self) -> Result<(), IdentityError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.expires_unix + SKEW_SECS < now {
            return Err(IdentityError::Malformed("the token has expired".into()));
        }
        Ok(())
    }

    pub(crate) fn jwt(&self) -> &str {
        self.jwt.as_str()
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn service_account(&self) -> &str {
        &self.service_account
    }

    pub(crate) fn digest(&self) -> [u8; 32] {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.jwt.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    fn request(token: &str) -> HashMap<String, String> {
        let value = serde_json::json!({"api://AzureADTokenExchange": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}});
        [(TOKENS_KEY.to_string(), value.to_string())].into()
    }

    #[test]
    fn secrets_win_over_volume_context_and_the_pod_must_match() {
        let far = 4_000_000_000u64;
        let a = jwt(serde_json::json!({"sub": "system:serviceaccount:ns:a", "exp": far}));
        let b = jwt(serde_json::json!({"sub": "system:serviceaccount:ns:b", "exp": far}));
        let t = PodToken::from_request(&request(&a), &request(&b), "api://AzureADTokenExchange")
            .unwrap();
        assert_eq!((t.namespace(), t.service_account()), ("ns", "a"));
        let t = PodToken::from_request(&HashMap::new(), &request(&b), "api://AzureADTokenExchange")
            .unwrap();
        assert_eq!(t.service_account(), "b");
        assert!(matches!(
            PodToken::from_request(
                &HashMap::new(),
                &HashMap::new(),
                "api://AzureADTokenExchange"
            ),
            Err(IdentityError::NoToken(_))
        ));
        assert!(matches!(
            PodToken::from_request(&request(&a), &HashMap::new(), "other-audience"),
            Err(IdentityError::NoToken(_))
        ));
        let mut ctx = HashMap::new();
        ctx.insert(
            "csi.storage.k8s.io/serviceAccount.name".to_string(),
            "b".to_string(),
        );
        assert!(matches!(
            PodToken::from_request(&request(&a), &ctx, "api://AzureADTokenExchange"),
            Err(IdentityError::Malformed(_))
        ));
        let printed = format!("{t:?}");
        assert!(!printed.contains("eyJ"), "{printed}");
    }

    #[test]
    fn malformed_and_expired_tokens() {
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "x.!!!.y",
            &jwt(serde_json::json!({"exp": 1})),
            &jwt(serde_json::json!({"sub": "user:alice", "exp": 1})),
        ] {
            assert!(PodToken::parse(bad).is_err(), "{bad}");
        }
        let old = PodToken::parse(&jwt(
            serde_json::json!({"sub": "system:serviceaccount:ns:a", "exp": 1000}),
        ))
        .unwrap();
        assert!(old.check_time().is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,200}") {
            let _ = PodToken::parse(&s);
            let map: HashMap<String, String> = [(TOKENS_KEY.to_string(), s.clone())].into();
            let _ = PodToken::from_request(&map, &HashMap::new(), "api://AzureADTokenExchange");
        }
    }
}
