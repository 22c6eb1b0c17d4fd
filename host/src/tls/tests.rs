use super::*;

fn der(path: &Path) -> Vec<u8> {
    load_certs(path).unwrap()[0].to_vec()
}

#[test]
fn dev_certs_map_to_identities() {
    let dir = tempfile::tempdir().unwrap();
    init_dev_certs(dir.path(), &["acme".into(), "globex".into()], "sluice").unwrap();
    let m = IdentityMapping::default();
    let acme = identity_from_der(&der(&dir.path().join("acme/cert.pem")), &m).unwrap();
    assert_eq!(
        (acme.tenant.as_str(), acme.client.as_str(), acme.admin),
        ("acme", "app", false)
    );
    assert!(
        acme.sans
            .iter()
            .any(|s| s == "URI:spiffe://sluice/tenant/acme/app"),
        "{:?}",
        acme.sans
    );
    let admin = identity_from_der(&der(&dir.path().join("admin/cert.pem")), &m).unwrap();
    assert!(admin.admin);
    assert!(
        init_dev_certs(dir.path(), &[], "sluice")
            .unwrap_err()
            .to_string()
            .contains("refusing")
    );

    issue_client_cert(
        dir.path(),
        Some("acme"),
        "billing",
        &dir.path().join("billing"),
        "sluice",
    )
    .unwrap();
    let b = identity_from_der(&der(&dir.path().join("billing/cert.pem")), &m).unwrap();
    assert_eq!((b.tenant.as_str(), b.client.as_str()), ("acme", "billing"));

    let other_domain = IdentityMapping {
        trust_domain: "prod".into(),
        ..IdentityMapping::default()
    };
    assert!(identity_from_der(&der(&dir.path().join("acme/cert.pem")), &other_domain).is_err());
    let subject_only = IdentityMapping {
        mode: MappingMode::SubjectOnly,
        ..IdentityMapping::default()
    };
    let s = identity_from_der(&der(&dir.path().join("acme/cert.pem")), &subject_only).unwrap();
    assert_eq!((s.tenant.as_str(), s.client.as_str()), ("acme", "app"));
}

#[test]
fn admins_list_restricts_administrators() {
    let dir = tempfile::tempdir().unwrap();
    init_dev_certs(dir.path(), &["acme".into()], "sluice").unwrap();
    issue_client_cert(dir.path(), None, "ops", &dir.path().join("ops"), "sluice").unwrap();
    let ops = der(&dir.path().join("ops/cert.pem"));
    let admin = der(&dir.path().join("admin/cert.pem"));
    let tenant = der(&dir.path().join("acme/cert.pem"));

    let any = IdentityMapping::default();
    assert!(identity_from_der(&ops, &any).unwrap().admin);
    assert!(identity_from_der(&admin, &any).unwrap().admin);

    let only_ops = IdentityMapping {
        admins: Some(vec!["ops".into()]),
        ..IdentityMapping::default()
    };
    let p = identity_from_der(&ops, &only_ops).unwrap();
    assert!(p.admin && p.client == "ops");
    let refused = identity_from_der(&admin, &only_ops).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("`admin` is not listed in [identity] admins"),
        "{refused}"
    );
    // Subject-mapped administrators are held to the same list.
    let by_subject = IdentityMapping {
        mode: MappingMode::SubjectOnly,
        ..only_ops.clone()
    };
    assert!(identity_from_der(&admin, &by_subject).is_err());
    assert!(identity_from_der(&ops, &by_subject).unwrap().admin);
    // Tenant clients are unaffected.
    assert!(!identity_from_der(&tenant, &only_ops).unwrap().admin);

    let none = IdentityMapping {
        admins: Some(vec![]),
        ..IdentityMapping::default()
    };
    assert!(
        identity_from_der(&ops, &none).is_err(),
        "an empty list admits no administrator"
    );
}

#[test]
fn admins_list_is_validated_when_parsed() {
    let ok: IdentityMapping = toml::from_str("admins = [\"ops\", \"alice-2\"]").unwrap();
    assert_eq!(
        ok.admins,
        Some(vec!["ops".to_string(), "alice-2".to_string()])
    );
    let bad = toml::from_str::<IdentityMapping>("admins = [\"Ops Team\"]").unwrap_err();
    assert!(
        bad.to_string()
            .contains("invalid administrator name `Ops Team`"),
        "{bad}"
    );
    let typo = toml::from_str::<IdentityMapping>("admin = [\"ops\"]").unwrap_err();
    assert!(typo.to_string().contains("unknown field `admin`"), "{typo}");
}

#[test]
fn openssl_made_certificates_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=test ca",
        "-days",
        "2",
    ]);
    std::fs::write(
        d.join("uri.ext"),
        "subjectAltName=URI:spiffe://sluice/tenant/acme/c1\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    std::fs::write(d.join("plain.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subj, ext) in [
        ("c1", "/CN=ignored", "uri.ext"),
        ("c2", "/O=acme/CN=c2", "plain.ext"),
    ] {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subj,
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            ext,
        ]);
    }
    let m = IdentityMapping::default();
    let c1 = identity_from_der(&der(&d.join("c1.pem")), &m).unwrap();
    assert_eq!((c1.tenant.as_str(), c1.client.as_str()), ("acme", "c1"));
    let c2 = identity_from_der(&der(&d.join("c2.pem")), &m).unwrap();
    assert_eq!((c2.tenant.as_str(), c2.client.as_str()), ("acme", "c2"));
    assert!(c2.subject.contains("O=acme"), "{}", c2.subject);
}
