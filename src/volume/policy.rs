//! The node operator's policy: what a StorageClass or, above all, a pod author's inline volume
//! may ask of this node. Secure by default: no unencrypted volumes unless named, Key Vault and
//! Managed HSM hosts of Azure's clouds only (a vault URL is a request the privileged driver
//! makes on the pod's behalf: without this, a pod could point it at any address), and inline
//! volumes only on the pools and up to the size the operator allows. Refusals are
//! INVALID_ARGUMENT naming the flag and what it allows.

use super::VolumeError;
use super::params::{KeyMode, VolumeParams};

/// The node's policy, from its flags.
#[derive(Debug, Clone)]
pub(crate) struct NodePolicy {
    pub(crate) allowed_key_modes: Vec<KeyMode>,
    pub(crate) allowed_vault_hosts: Vec<HostRule>,
    /// Pools inline volumes may use; empty: only the default pool.
    pub(crate) inline_pools: Vec<String>,
    pub(crate) inline_max_bytes: u64,
}

/// One entry of `--allowed-vault-hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostRule {
    /// Lower-cased; with a leading '.', a suffix matched on a label boundary.
    host: String,
    /// The port the entry names; None: 443 only.
    port: Option<u16>,
}

impl std::str::FromStr for HostRule {
    type Err = String;

    fn from_str(entry: &str) -> Result<HostRule, String> {
        let entry = entry.trim().to_ascii_lowercase();
        let bad = || {
            format!(
                "{entry:?} is not a host entry: use a host (x.vault.azure.net), a suffix (.vault.azure.net) or an IP literal, with an optional :port"
            )
        };
        let (host, port) = match entry.rsplit_once(':') {
            // An IPv6 literal names its port after the bracket.
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                (h.to_string(), Some(p.parse::<u16>().map_err(|_| bad())?))
            }
            _ => (entry.clone(), None),
        };
        let name = host.trim_start_matches('.');
        let valid = !name.is_empty()
            && !host.contains(['/', '@', '?', '#', ' ', '*'])
            && !host.starts_with("..");
        if !valid {
            return Err(bad());
        }
        Ok(HostRule { host, port })
    }
}

impl HostRule {
    fn matches(&self, host: &str, port: u16, is_ip: bool) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == 443,
        };
        let host_ok = match self.host.strip_prefix('.') {
            // IP literals only when listed as themselves.
            Some(_) if is_ip => false,
            Some(_) => host.len() > self.host.len() && host.ends_with(&self.host),
            None => host == self.host,
        };
        port_ok && host_ok
    }
}

impl std::fmt::Display for HostRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

fn refused(field: &'static str, message: String) -> VolumeError {
    VolumeError::InvalidArgument { field, message }
}

impl NodePolicy {
    /// Whether this node serves volumes with these parameters (a StorageClass's or an inline
    /// volume's): the key mode and the vault host.
    pub(crate) fn check(
        &self,
        params: &VolumeParams,
        field: &'static str,
    ) -> Result<(), VolumeError> {
        if !self.allowed_key_modes.contains(&params.key_mode) {
            return Err(refused(
                field,
                format!(
                    "keyMode {} is not allowed on this node (--allowed-key-modes: {})",
                    params.key_mode.as_str(),
                    self.allowed_key_modes
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ));
        }
        if let Some(kms) = &params.kms {
            self.check_vault(&kms.vault_url, field)?;
        }
        Ok(())
    }

    /// The vault URL must be https, without user info, query or path, on an allowed host.
    pub(crate) fn check_vault(&self, url: &str, field: &'static str) -> Result<(), VolumeError> {
        let allowed = || {
            self.allowed_vault_hosts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let parsed = reqwest::Url::parse(url)
            .map_err(|_| refused(field, format!("keyVaultURL {url:?} is not a URL")))?;
        if parsed.scheme() != "https"
            || !parsed.username().is_empty()
            || parsed.password().is_some()
            || parsed.query().is_some()
            || parsed.fragment().is_some()
            || !matches!(parsed.path(), "" | "/")
        {
            return Err(refused(
                field,
                format!(
                    "keyVaultURL {url:?} must be https://HOST[:PORT] with no user, path or query"
                ),
            ));
        }
        let (host, is_ip) = match parsed.host() {
            Some(url::Host::Domain(d)) => (d.to_ascii_lowercase(), false),
            Some(url::Host::Ipv4(ip)) => (ip.to_string(), true),
            Some(url::Host::Ipv6(ip)) => (format!("[{ip}]"), true),
            None => return Err(refused(field, format!("keyVaultURL {url:?} has no host"))),
        };
        let port = parsed.port_or_known_default().unwrap_or(443);
        if self
            .allowed_vault_hosts
            .iter()
            .any(|r| r.matches(&host, port, is_ip))
        {
            return Ok(());
        }
        Err(refused(
            field,
            format!(
                "keyVaultURL host {host}:{port} is not allowed on this node (--allowed-vault-hosts: {})",
                allowed()
            ),
        ))
    }

    /// An inline volume's pool and size, beyond `check`.
    pub(crate) fn check_inline(
        &self,
        params: &VolumeParams,
        size: u64,
        default_pool: &str,
    ) -> Result<(), VolumeError> {
        self.check(params, "volume_context")?;
        let pool = params.pool.as_deref().unwrap_or(default_pool);
        let allowed: Vec<&str> = if self.inline_pools.is_empty() {
            vec![default_pool]
        } else {
            self.inline_pools.iter().map(String::as_str).collect()
        };
        if !allowed.contains(&pool) {
            return Err(refused(
                "volume_context.pool",
                format!(
                    "inline volumes may not use pool {pool:?} on this node (--inline-pools: {})",
                    allowed.join(",")
                ),
            ));
        }
        if size > self.inline_max_bytes {
            return Err(refused(
                "volume_context.size",
                format!(
                    "{size} bytes is more than inline volumes may have on this node (--inline-max-size: {} bytes)",
                    self.inline_max_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// `--allowed-key-modes`: a comma-separated list of key modes.
pub(crate) fn parse_key_modes(list: &str) -> Result<Vec<KeyMode>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s {
            "none" => Ok(KeyMode::None),
            "keyvault-key" => Ok(KeyMode::KeyvaultKey),
            "keyvault-secret" => Ok(KeyMode::KeyvaultSecret),
            other => Err(format!(
                "--allowed-key-modes: {other:?} is not a key mode; accepted: keyvault-key, keyvault-secret, none"
            )),
        })
        .collect()
}

/// `--allowed-vault-hosts`: a comma-separated list of host entries.
pub(crate) fn parse_host_rules(list: &str) -> Result<Vec<HostRule>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| format!("--allowed-vault-hosts: {e}")))
        .collect()
}

/// The default of `--allowed-vault-hosts`: Key Vault and Managed HSM in Azure's public and
/// sovereign clouds.
pub(crate) fn default_vault_hosts() -> String {
    crate::keys::known_vault_suffixes()
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(hosts: &str) -> NodePolicy {
        NodePolicy {
            allowed_key_modes: vec![KeyMode::KeyvaultKey],
            allowed_vault_hosts: parse_host_rules(hosts).unwrap(),
            inline_pools: vec![],
            inline_max_bytes: 1 << 30,
        }
    }

    fn allowed(p: &NodePolicy, url: &str) -> bool {
        p.check_vault(url, "parameters").is_ok()
    }

    #[test]
    fn defaults_allow_azure_vaults_only() {
        let p = policy(&default_vault_hosts());
        for ok in [
            "https://x.vault.azure.net",
            "https://X.Vault.Azure.Net/",
            "https://x.vault.azure.net:443",
            "https://h.managedhsm.azure.net",
            "https://x.vault.usgovcloudapi.net",
            "https://x.vault.azure.cn",
        ] {
            assert!(allowed(&p, ok), "{ok}");
        }
        for bad in [
            "https://xvault.azure.net",
            "https://vault.azure.net",
            "https://x.vault.azure.net.evil.com",
            "https://x.vault.azure.net:8443",
            "http://x.vault.azure.net",
            "https://user@x.vault.azure.net",
            "https://x.vault.azure.net/keys",
            "https://x.vault.azure.net?x=1",
            "https://169.254.169.254",
            "https://127.0.0.1",
            "https://[::1]",
            "not a url",
        ] {
            assert!(!allowed(&p, bad), "{bad}");
        }
    }

    #[test]
    fn ip_literals_and_ports_only_when_listed() {
        let p = policy("127.0.0.1:8443,[::1]:9443,kv.internal");
        assert!(allowed(&p, "https://127.0.0.1:8443"));
        assert!(!allowed(&p, "https://127.0.0.1:8444"));
        assert!(!allowed(&p, "https://127.0.0.1"));
        assert!(allowed(&p, "https://[::1]:9443"));
        assert!(allowed(&p, "https://kv.internal"));
        assert!(!allowed(&p, "https://a.kv.internal"));
        let e = p
            .check_vault("https://evil.example", "parameters")
            .unwrap_err();
        assert!(e.to_string().contains("--allowed-vault-hosts"), "{e}");
        assert!(parse_host_rules("a/b").is_err());
        assert!(parse_host_rules("*.vault.azure.net").is_err());
    }

    #[test]
    fn key_modes_and_inline_limits() {
        assert!(parse_key_modes("keyvault-key,none").is_ok());
        assert!(parse_key_modes("plain").is_err());
        let p = policy(".vault.azure.net");
        let none =
            VolumeParams::from_parameters(&[("keyMode".to_string(), "none".to_string())].into())
                .unwrap();
        let e = p.check(&none, "parameters").unwrap_err();
        assert!(e.to_string().contains("--allowed-key-modes"), "{e}");
        let kv = VolumeParams::from_parameters(
            &[
                (
                    "keyVaultURL".to_string(),
                    "https://x.vault.azure.net".to_string(),
                ),
                ("keyName".to_string(), "k".to_string()),
            ]
            .into(),
        )
        .unwrap();
        assert!(p.check_inline(&kv, 1 << 20, "default").is_ok());
        let e = p.check_inline(&kv, 2 << 30, "default").unwrap_err();
        assert!(e.to_string().contains("--inline-max-size"), "{e}");
        let mut other_pool = kv.clone();
        other_pool.pool = Some("fast".into());
        let e = p.check_inline(&other_pool, 1 << 20, "default").unwrap_err();
        assert!(e.to_string().contains("--inline-pools"), "{e}");
    }

    proptest! {
        #[test]
        fn checking_never_panics(url in "\\PC{0,80}", entry in "\\PC{0,40}") {
            let _ = parse_host_rules(&entry);
            let _ = policy(".vault.azure.net").check_vault(&url, "parameters");
        }
    }
}
