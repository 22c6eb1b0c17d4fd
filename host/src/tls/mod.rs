//! TLS for QUIC: the server configuration (client certificates required),
//! identities taken from certificates, and development certificates.
//!
//! # Identity mapping
//!
//! A client's identity comes from its certificate (after the TLS handshake
//! verified it chains to a configured CA and is not revoked):
//!
//! 1. a SAN URI `spiffe://<trust-domain>/tenant/<tenant>/<client>` names a
//!    tenant client; `spiffe://<trust-domain>/admin/<client>` an administrator;
//!    a SPIFFE URI with another trust domain is refused;
//! 2. otherwise (mode `spiffe-then-subject`, the default, or `subject-only`)
//!    the subject's O is the tenant and CN the client; O = `sluice:admin`
//!    makes an administrator. Certificates made with plain `openssl` work
//!    this way.
//!
//! Tenant and client names must match `[a-z0-9][a-z0-9_-]{0,62}`.
//!
//! `[identity] admins = ["ops", ...]` restricts administrators to the listed
//! client names: an administrator certificate for any other name is refused
//! at connect, like an unknown identity. Unset, every administrator
//! certificate the CA signed is accepted.

mod certs;

pub use certs::{init_dev_certs, init_node_certs, issue_client_cert, issue_node_cert, revoke_cert};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::plugins::Principal;

/// ALPN id of the Sluice protocol.
pub const ALPN: &[u8] = b"sluice/1";

/// Subject organization that marks an administrator certificate.
pub const ADMIN_ORG: &str = "sluice:admin";

/// How certificates map to identities.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityMapping {
    /// SPIFFE trust domain. Default `sluice`.
    pub trust_domain: String,
    /// Which certificate fields are used.
    pub mode: MappingMode,
    /// The only administrator client names accepted (unset: any
    /// administrator certificate signed by the CA).
    #[serde(deserialize_with = "admin_names")]
    pub admins: Option<Vec<String>>,
}

impl Default for IdentityMapping {
    fn default() -> Self {
        Self {
            trust_domain: "sluice".into(),
            mode: MappingMode::SpiffeThenSubject,
            admins: None,
        }
    }
}

/// Parses `admins`, refusing names no certificate could carry.
fn admin_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let names = <Vec<String> as serde::Deserialize>::deserialize(d)?;
    if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
        return Err(serde::de::Error::custom(format!(
            "invalid administrator name `{bad}` (expected [a-z0-9][a-z0-9_-]{{0,62}})"
        )));
    }
    Ok(Some(names))
}

/// Which certificate fields name the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingMode {
    /// SPIFFE URI SAN, else subject O/CN.
    #[default]
    SpiffeThenSubject,
    /// SPIFFE URI SAN only.
    SpiffeOnly,
    /// Subject O/CN only.
    SubjectOnly,
}

/// Why a certificate gives no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No peer certificate.
    #[error("the client presented no certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("cannot parse the client certificate: {0}")]
    Parse(String),
    /// No usable identity field.
    #[error("certificate names no identity: {0}")]
    NoIdentity(String),
    /// A name is malformed.
    #[error("certificate names an invalid {what} `{name}` (expected [a-z0-9][a-z0-9_-]{{0,62}})")]
    BadName {
        /// tenant or client.
        what: &'static str,
        /// The name.
        name: String,
    },
}

/// Why TLS could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Files making up the server's TLS setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// CA certificates client certificates must chain to.
    pub ca: Vec<PathBuf>,
    /// Certificate revocation lists (PEM).
    pub crls: Vec<PathBuf>,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
}

impl ServerTlsFiles {
    /// The layout written by [`init_dev_certs`]: `ca.pem`, `server/cert.pem`,
    /// `server/key.pem`, and every `*.crl.pem` in `dir`.
    pub fn from_dir(dir: &Path) -> Self {
        let mut crls: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_str().is_some_and(|s| s.ends_with(".crl.pem")))
            .collect();
        crls.sort();
        Self {
            ca: vec![dir.join("ca.pem")],
            crls,
            cert: dir.join("server/cert.pem"),
            key: dir.join("server/key.pem"),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load PEM certificates.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Load a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

/// The QUIC server configuration: TLS 1.3, ALPN `sluice/1`, a client
/// certificate chaining to `files.ca` required (and checked against the CRLs).
pub fn server_config(files: &ServerTlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in &files.ca {
        for c in load_certs(ca)? {
            roots.add(c).map_err(|e| file_err(ca, e))?;
        }
    }
    let mut crls = Vec::new();
    for path in &files.crls {
        for crl in
            CertificateRevocationListDer::pem_file_iter(path).map_err(|e| file_err(path, e))?
        {
            crls.push(crl.map_err(|e| file_err(path, e))?);
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let crypto = server_crypto(verifier, &files.cert, &files.key, ALPN)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        std::time::Duration::from_secs(30)
            .try_into()
            .map_err(|e| TlsError::Config(format!("{e}")))?,
    ));
    // A client opens exactly one stream, the bidirectional control stream;
    // deliveries come on streams the broker opens. Opening more is a QUIC
    // stream-limit violation, so a client cannot park data on streams the
    // broker never reads.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// TLS 1.3 with `verifier` for client certificates, this server's
/// certificate and key, one ALPN and no early data.
fn server_crypto(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cert: &Path,
    key: &Path,
    alpn: &[u8],
) -> Result<QuicServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'_' | b'-'))
        })
}

fn checked(what: &'static str, name: &str) -> Result<String, IdentityError> {
    if valid_name(name) {
        Ok(name.to_string())
    } else {
        Err(IdentityError::BadName {
            what,
            name: name.to_string(),
        })
    }
}

/// An administrator's client name, if valid and allowed by `admins`.
fn admin(mapping: &IdentityMapping, client: &str) -> Result<String, IdentityError> {
    let client = checked("client", client)?;
    match &mapping.admins {
        Some(list) if !list.contains(&client) => Err(IdentityError::NoIdentity(format!(
            "administrator `{client}` is not listed in [identity] admins"
        ))),
        _ => Ok(client),
    }
}

/// The identity in a DER certificate.
pub fn identity_from_der(
    der: &[u8],
    mapping: &IdentityMapping,
) -> Result<Principal, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut sans = Vec::new();
    let mut spiffe = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::URI(u) => {
                    sans.push(format!("URI:{u}"));
                    if let Some(rest) = u.strip_prefix("spiffe://") {
                        spiffe.push(rest.to_string());
                    }
                }
                GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                other => sans.push(format!("{other}")),
            }
        }
    }
    let subject = cert.subject().to_string();
    let principal = |tenant: String, client: String, admin: bool| Principal {
        tenant,
        client,
        subject: subject.clone(),
        sans: sans.clone(),
        admin,
    };
    if mapping.mode != MappingMode::SubjectOnly
        && let Some(id) = spiffe.first()
    {
        let (domain, path) = id.split_once('/').unwrap_or((id.as_str(), ""));
        if domain != mapping.trust_domain {
            return Err(IdentityError::NoIdentity(format!(
                "SPIFFE trust domain `{domain}` is not `{}`",
                mapping.trust_domain
            )));
        }
        let parts: Vec<&str> = path.split('/').collect();
        return match parts[..] {
            ["tenant", tenant, client] => Ok(principal(
                checked("tenant", tenant)?,
                checked("client", client)?,
                false,
            )),
            ["admin", client] => Ok(principal(String::new(), admin(mapping, client)?, true)),
            _ => Err(IdentityError::NoIdentity(format!(
                "SPIFFE id `spiffe://{id}` is neither /tenant/<tenant>/<client> nor /admin/<client>"
            ))),
        };
    }
    if mapping.mode == MappingMode::SpiffeOnly {
        return Err(IdentityError::NoIdentity("no SPIFFE URI SAN".into()));
    }
    let org = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|a| a.as_str().ok());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok());
    match (org, cn) {
        (Some(ADMIN_ORG), Some(cn)) => Ok(principal(String::new(), admin(mapping, cn)?, true)),
        (Some(o), Some(cn)) => Ok(principal(
            checked("tenant", o)?,
            checked("client", cn)?,
            false,
        )),
        _ => Err(IdentityError::NoIdentity(format!(
            "no SPIFFE URI SAN and the subject `{subject}` lacks O (tenant) or CN (client)"
        ))),
    }
}

/// The identity of a connected peer.
pub fn peer_identity(
    conn: &quinn::Connection,
    mapping: &IdentityMapping,
) -> Result<Principal, IdentityError> {
    let chain = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    identity_from_der(leaf, mapping)
}

/// The serial number of a connected peer's certificate.
pub fn peer_serial(conn: &quinn::Connection) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = X509Certificate::from_der(chain.first()?).ok()?;
    Some(cert.raw_serial().to_vec())
}

/// Serial numbers revoked by the CRLs in `files`.
pub fn revoked_serials(files: &ServerTlsFiles) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut out = Vec::new();
    for path in &files.crls {
        for crl in
            CertificateRevocationListDer::pem_file_iter(path).map_err(|e| file_err(path, e))?
        {
            let crl = crl.map_err(|e| file_err(path, e))?;
            let (_, parsed) = <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(&crl)
                .map_err(|e| file_err(path, e))?;
            out.extend(
                parsed
                    .iter_revoked_certificates()
                    .map(|r| r.raw_serial().to_vec()),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

/// The name a cluster node has in its certificate and is dialled by.
pub fn node_name(id: u64) -> String {
    format!("node-{id}")
}

/// ALPN of the connections between cluster nodes.
pub const CLUSTER_ALPN: &[u8] = b"sluice-raft/1";

/// A cluster node's TLS identity: a folder written by [`init_node_certs`]
/// (`ca.pem` of the cluster CA, `cert.pem`, `key.pem`).
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// The cluster CA, the only one node certificates are checked against.
    pub ca: PathBuf,
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

impl NodeTls {
    /// The identity in folder `dir`.
    pub fn from_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(&self.ca)? {
            roots.add(c).map_err(|e| file_err(&self.ca, e))?;
        }
        Ok(roots)
    }

    /// The server side of node connections: TLS 1.3, ALPN
    /// [`CLUSTER_ALPN`], a client certificate of the cluster CA required.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let crypto = server_crypto(verifier, &self.cert, &self.key, CLUSTER_ALPN)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(node_transport()?);
        Ok(server)
    }

    /// The client side: the peer must present a cluster-CA certificate for
    /// the node name dialled; this node presents its own.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(load_certs(&self.cert)?, load_key(&self.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![CLUSTER_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(node_transport()?);
        Ok(client)
    }
}

/// Node connections: kept alive every second, closed after 5 s without a
/// packet, so a node that died (UDP tells nothing) is noticed in seconds
/// and its peers dial it afresh when it is back, instead of talking into
/// the old connection until quinn's default 30 s idle timeout (heartbeats,
/// which openraft cuts off sooner, would never reach the new process).
fn node_transport() -> Result<Arc<quinn::TransportConfig>, TlsError> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        std::time::Duration::from_secs(5)
            .try_into()
            .map_err(|e| TlsError::Config(format!("{e}")))?,
    ));
    Ok(Arc::new(transport))
}
