//! The emulator's own CA and its server certificate for 127.0.0.1 / localhost / ::1. The CA is
//! generated at start, or loaded from PEM files so that clients keep trusting it across
//! restarts; clients trust the CA certificate written with `--ca-out`. The CA also issues
//! certificates for the servers the emulator starts (Azurite), so clients trust one CA only.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct Tls {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Builds the TLS set-up: a new CA when `ca` is None, else the given (certificate, key) PEMs.
pub fn build(ca: Option<(String, String)>) -> Result<Tls, String> {
    let (ca_cert_pem, ca_key_pem) = match ca {
        Some(pair) => pair,
        None => {
            let key = KeyPair::generate().map_err(err)?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
            params
                .distinguished_name
                .push(DnType::CommonName, "sealvol Azure emulator CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).map_err(err)?;
            (cert.pem(), key.serialize_pem())
        }
    };
    let (server_cert, server_key) = leaf(&ca_cert_pem, &ca_key_pem)?;

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], key_der)
        .map_err(err)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Tls {
        ca_cert_pem,
        ca_key_pem,
        server_config: Arc::new(config),
    })
}

impl Tls {
    /// A new server certificate for 127.0.0.1 / localhost / ::1 signed by this CA, with its
    /// key: (certificate PEM, PKCS#8 key PEM), for a server that reads PEM files.
    pub fn issue_server_cert(&self) -> Result<(String, String), String> {
        let (cert, key) = leaf(&self.ca_cert_pem, &self.ca_key_pem)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A server certificate for the loopback names, signed by the CA.
fn leaf(ca_cert_pem: &str, ca_key_pem: &str) -> Result<(rcgen::Certificate, KeyPair), String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(err)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(err)?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    Ok((cert, key))
}
