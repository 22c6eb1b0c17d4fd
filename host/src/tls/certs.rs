//! Development certificates: a CA, a server certificate, an admin identity
//! and one identity folder per tenant (`cert.pem`, `key.pem`, `ca.pem`).

use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::{ADMIN_ORG, TlsError, file_err, valid_name};

fn rc(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("certificate generation: {e}"))
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| file_err(parent, e))?;
    }
    fs::write(path, contents).map_err(|e| file_err(path, e))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| file_err(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Sluice development CA");
    dn.push(DnType::OrganizationName, "sluice");
    p.distinguished_name = dn;
    p
}

/// Write a client identity folder signed by `ca`.
fn client(
    dir: &Path,
    ca: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    tenant: Option<&str>,
    client: &str,
    trust_domain: &str,
) -> Result<(), TlsError> {
    let uri = match tenant {
        Some(t) => format!("spiffe://{trust_domain}/tenant/{t}/{client}"),
        None => format!("spiffe://{trust_domain}/admin/{client}"),
    };
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().map_err(rc)?)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, client);
    dn.push(DnType::OrganizationName, tenant.unwrap_or(ADMIN_ORG));
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(rc)?;
    let cert = p.signed_by(&key, ca).map_err(rc)?;
    write(&dir.join("cert.pem"), &cert.pem(), false)?;
    write(&dir.join("key.pem"), &key.serialize_pem(), true)?;
    write(&dir.join("ca.pem"), ca_pem, false)
}

/// Create a development PKI in `out`: `ca.pem`/`ca.key`, `server/`
/// (localhost, 127.0.0.1, ::1), `admin/` and one folder per tenant holding
/// the identity of client `app`. Refuses to replace an existing CA.
pub fn init_dev_certs(out: &Path, tenants: &[String], trust_domain: &str) -> Result<(), TlsError> {
    if out.join("ca.pem").exists() {
        return Err(file_err(
            &out.join("ca.pem"),
            "a CA already exists here; refusing to overwrite it",
        ));
    }
    for t in tenants {
        if !valid_name(t) || t == "server" || t == "admin" {
            return Err(TlsError::Config(format!(
                "invalid tenant name `{t}` (expected [a-z0-9][a-z0-9_-]{{0,62}}, not server/admin)"
            )));
        }
    }
    let ca_key = KeyPair::generate().map_err(rc)?;
    let params = ca_params();
    let ca_cert = params.self_signed(&ca_key).map_err(rc)?;
    let ca_pem = ca_cert.pem();
    write(&out.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let ca = Issuer::new(params, ca_key);

    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).map_err(rc)?;
    sp.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    sp.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "sluice server");
    sp.distinguished_name = dn;
    let skey = KeyPair::generate().map_err(rc)?;
    let scert = sp.signed_by(&skey, &ca).map_err(rc)?;
    write(&out.join("server/cert.pem"), &scert.pem(), false)?;
    write(&out.join("server/key.pem"), &skey.serialize_pem(), true)?;

    client(
        &out.join("admin"),
        &ca,
        &ca_pem,
        None,
        "admin",
        trust_domain,
    )?;
    for t in tenants {
        client(&out.join(t), &ca, &ca_pem, Some(t), "app", trust_domain)?;
    }
    // Written last: its presence means the folder is complete.
    write(&out.join("ca.pem"), &ca_pem, false)
}

/// The CA in `ca_dir` (`ca.pem` + `ca.key`): its PEM and an issuer.
fn load_ca(ca_dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), TlsError> {
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = fs::read_to_string(&ca_pem_path).map_err(|e| file_err(&ca_pem_path, e))?;
    let key_pem = fs::read_to_string(&ca_key_path).map_err(|e| file_err(&ca_key_path, e))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&ca_key_path, e))?;
    let ca = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| file_err(&ca_pem_path, e))?;
    Ok((ca_pem, ca))
}

/// Issue a client identity folder `out` for `tenant`/`client` (an
/// administrator when `tenant` is `None`) with the CA in `ca_dir` (`ca.pem`
/// + `ca.key`).
pub fn issue_client_cert(
    ca_dir: &Path,
    tenant: Option<&str>,
    client_name: &str,
    out: &Path,
    trust_domain: &str,
) -> Result<(), TlsError> {
    let names = [("tenant", tenant), ("client", Some(client_name))];
    for (what, n) in names.into_iter().filter_map(|(w, n)| Some((w, n?))) {
        if !valid_name(n) {
            return Err(TlsError::Config(format!(
                "invalid {what} name `{n}` (expected [a-z0-9][a-z0-9_-]{{0,62}})"
            )));
        }
    }
    let (ca_pem, ca) = load_ca(ca_dir)?;
    client(out, &ca, &ca_pem, tenant, client_name, trust_domain)
}

/// Revoke the client certificate `cert` with the CA in `ca_dir`: its serial
/// is added to `ca_dir/revoked.crl.pem` (created if missing), a CRL signed by
/// the CA that `sluice serve` loads with the other `*.crl.pem` files.
pub fn revoke_cert(ca_dir: &Path, cert: &Path) -> Result<(), TlsError> {
    use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};

    let der = super::load_certs(cert)?.remove(0);
    let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| file_err(cert, e))?;
    let serial = parsed.raw_serial().to_vec();

    let crl_path = ca_dir.join("revoked.crl.pem");
    let mut serials: Vec<Vec<u8>> = Vec::new();
    if crl_path.exists() {
        let existing = CertificateRevocationListDer::from_pem_file(&crl_path)
            .map_err(|e| file_err(&crl_path, e))?;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&existing)
            .map_err(|e| file_err(&crl_path, e))?;
        serials.extend(
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec()),
        );
    }
    if !serials.contains(&serial) {
        serials.push(serial);
    }
    let (_, ca) = load_ca(ca_dir)?;
    let now = rcgen::date_time_ymd(2024, 1, 1);
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: rcgen::date_time_ymd(2124, 1, 1),
        crl_number: SerialNumber::from(serials.len() as u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca).map_err(rc)?;
    write(&crl_path, &crl.pem().map_err(rc)?, false)
}

/// Create the PKI of a cluster's nodes in `out`: a cluster CA of its own
/// (`ca.pem`/`ca.key`, never the tenants' CA, so no tenant or administrator
/// certificate can pass as a node) and `node-{id}/` (`cert.pem`, `key.pem`,
/// `ca.pem`) per node id, each valid as server and client as `node-{id}`.
/// Refuses to replace an existing CA.
pub fn init_node_certs(out: &Path, nodes: &[u64]) -> Result<(), TlsError> {
    if out.join("ca.pem").exists() {
        return Err(file_err(
            &out.join("ca.pem"),
            "a CA already exists here; refusing to overwrite it",
        ));
    }
    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut params = ca_params();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Sluice cluster CA");
    dn.push(DnType::OrganizationName, CLUSTER_ORG);
    params.distinguished_name = dn;
    let ca_cert = params.self_signed(&ca_key).map_err(rc)?;
    let ca_pem = ca_cert.pem();
    write(&out.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let ca = Issuer::new(params, ca_key);
    for id in nodes {
        node(&out.join(super::node_name(*id)), &ca, &ca_pem, *id)?;
    }
    write(&out.join("ca.pem"), &ca_pem, false)
}

/// Organization of the cluster CA and of every node certificate.
const CLUSTER_ORG: &str = "sluice-cluster";

/// Issue the identity of node `id` into `out` (`cert.pem`, `key.pem`,
/// `ca.pem`) with the cluster CA in `ca_dir` (`init_node_certs` wrote it);
/// the tenants' CA is refused, its nodes would be refused by every node.
pub fn issue_node_cert(ca_dir: &Path, id: u64, out: &Path) -> Result<(), TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (ca_pem, ca) = load_ca(ca_dir)?;
    let der = super::load_certs(&ca_dir.join("ca.pem"))?.remove(0);
    let (_, parsed) =
        X509Certificate::from_der(&der).map_err(|e| file_err(&ca_dir.join("ca.pem"), e))?;
    let cluster = parsed
        .subject()
        .iter_organization()
        .any(|o| o.as_str() == Ok(CLUSTER_ORG));
    if !cluster {
        return Err(file_err(
            &ca_dir.join("ca.pem"),
            "not a cluster CA (node identities come from the `cluster` folder of `sluice certs init --node N`)",
        ));
    }
    if out.join("cert.pem").exists() {
        return Err(file_err(
            &out.join("cert.pem"),
            "an identity exists here already; refusing to overwrite it",
        ));
    }
    node(out, &ca, &ca_pem, id)
}

/// Write the identity of node `id` into `dir`, signed by `ca`.
fn node(dir: &Path, ca: &Issuer<'static, KeyPair>, ca_pem: &str, id: u64) -> Result<(), TlsError> {
    let name = super::node_name(id);
    let mut p = CertificateParams::new(vec![name.clone()]).map_err(rc)?;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.as_str());
    dn.push(DnType::OrganizationName, CLUSTER_ORG);
    p.distinguished_name = dn;
    let key = KeyPair::generate().map_err(rc)?;
    let cert = p.signed_by(&key, ca).map_err(rc)?;
    write(&dir.join("cert.pem"), &cert.pem(), false)?;
    write(&dir.join("key.pem"), &key.serialize_pem(), true)?;
    write(&dir.join("ca.pem"), ca_pem, false)
}
