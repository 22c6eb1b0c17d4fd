use super::*;

#[allow(dead_code)]
#[path = "../../../tests/support/provision.rs"]
mod provision;

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
    provision::require("the openssl certificate tests", provision::OPENSSL);
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

/// Property tests of the identity parser on arbitrary bytes and on damaged
/// real certificates, and the seed corpus of the `identity` fuzz target
/// (`host/fuzz`), which is made of the same certificates.
mod identity_props {
    use super::*;
    use crate::plugins::Principal;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// What the default mapping makes of a sample certificate.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Expect {
        Tenant(&'static str, &'static str),
        Admin(&'static str),
        Refused,
    }
    use Expect::*;

    struct Sample {
        name: String,
        der: Vec<u8>,
        expect: Expect,
    }

    /// Certificate names and the rules, spelled independently of `valid_name`.
    fn name_ok(s: &str) -> bool {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        first_ok
            && s.chars().count() <= 63
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    }

    const LISTED: [&str; 2] = ["admin", "ops"];
    const CN_63: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const CN_64: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn mapping(mode: MappingMode, listed: bool) -> IdentityMapping {
        IdentityMapping {
            mode,
            admins: listed.then(|| LISTED.iter().map(|s| s.to_string()).collect()),
            ..IdentityMapping::default()
        }
    }

    const MODES: [MappingMode; 3] = [
        MappingMode::SpiffeThenSubject,
        MappingMode::SpiffeOnly,
        MappingMode::SubjectOnly,
    ];

    /// Parse `der` under every mode, with and without an admins list, and
    /// check what is accepted: valid names, administrators without tenant,
    /// modes that agree, an admins list that only refuses unlisted
    /// administrators. Returns the default mapping's result.
    fn check_everywhere(der: &[u8]) -> Result<Principal, IdentityError> {
        let mut default: Option<Result<Principal, IdentityError>> = None;
        for listed in [false, true] {
            let [both, spiffe, subject] = MODES.map(|mode| {
                let m = mapping(mode, listed);
                let r = identity_from_der(der, &m);
                if let Ok(p) = &r {
                    assert!(name_ok(&p.client), "client `{}`", p.client);
                    if p.admin {
                        assert_eq!(p.tenant, "", "an administrator has no tenant");
                        if listed {
                            assert!(LISTED.contains(&p.client.as_str()), "{}", p.client);
                        }
                    } else {
                        assert!(name_ok(&p.tenant), "tenant `{}`", p.tenant);
                    }
                }
                r
            });
            let no_uri = Err(IdentityError::NoIdentity("no SPIFFE URI SAN".into()));
            let expected = if spiffe == no_uri { &subject } else { &spiffe };
            assert_eq!(&both, expected, "spiffe-then-subject disagrees");
            if let Ok(p) = &spiffe {
                let want = if p.admin {
                    format!("URI:spiffe://sluice/admin/{}", p.client)
                } else {
                    format!("URI:spiffe://sluice/tenant/{}/{}", p.tenant, p.client)
                };
                let first = p.sans.iter().find(|s| s.starts_with("URI:spiffe://"));
                assert_eq!(first, Some(&want));
            }
            if listed {
                let open = default.take().expect("unlisted run first");
                match &open {
                    Ok(p) if p.admin && !LISTED.contains(&p.client.as_str()) => {
                        assert!(both.is_err(), "unlisted administrator accepted")
                    }
                    _ => assert_eq!(both, open, "the admins list changed a tenant result"),
                }
                default = Some(open);
            } else {
                default = Some(both);
            }
        }
        default.expect("ran")
    }

    fn openssl(dir: &Path, args: &[&str]) {
        super::provision::require("the openssl certificate tests", super::provision::OPENSSL);
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Real certificates: the development PKI's (rcgen), ones issued for
    /// another trust domain, and `openssl req` ones covering subject
    /// mapping, SPIFFE tenants and administrators, foreign trust domains,
    /// malformed SPIFFE paths, missing or invalid subject fields.
    fn samples() -> &'static [Sample] {
        static SAMPLES: OnceLock<Vec<Sample>> = OnceLock::new();
        SAMPLES.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let mut out = Vec::new();
            let mut add = |name: &str, der: Vec<u8>, expect| {
                out.push(Sample {
                    name: name.into(),
                    der,
                    expect,
                })
            };

            let dev = d.join("dev");
            init_dev_certs(&dev, &["acme".into(), "globex".into()], "sluice").unwrap();
            issue_client_cert(&dev, Some("acme"), "billing", &d.join("billing"), "sluice").unwrap();
            issue_client_cert(&dev, None, "ops", &d.join("ops"), "sluice").unwrap();
            let prod = d.join("prod");
            init_dev_certs(&prod, &["acme".into()], "prod").unwrap();
            for (name, path, expect) in [
                ("rcgen-tenant", dev.join("acme/cert.pem"), Tenant("acme", "app")),
                ("rcgen-tenant-2", dev.join("globex/cert.pem"), Tenant("globex", "app")),
                ("rcgen-issued-tenant", d.join("billing/cert.pem"), Tenant("acme", "billing")),
                ("rcgen-admin", dev.join("admin/cert.pem"), Admin("admin")),
                ("rcgen-issued-admin", d.join("ops/cert.pem"), Admin("ops")),
                ("rcgen-server", dev.join("server/cert.pem"), Refused),
                ("rcgen-ca", dev.join("ca.pem"), Refused),
                ("rcgen-wrong-domain-tenant", prod.join("acme/cert.pem"), Refused),
                ("rcgen-wrong-domain-admin", prod.join("admin/cert.pem"), Refused),
            ] {
                add(name, der(&path), expect);
            }

            let o = d.join("openssl");
            std::fs::create_dir_all(&o).unwrap();
            let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
            let mut ca = vec!["req", "-x509", "-nodes", "-keyout", "ca.key", "-out", "ca.pem"];
            ca.extend(ec);
            ca.extend(["-subj", "/CN=openssl test ca", "-days", "2"]);
            openssl(&o, &ca);
            let subj_long = format!("/O=acme/CN={CN_64}");
            let subj_longest = format!("/O=acme/CN={CN_63}");
            let cases: Vec<(&str, &str, &str, &str, Expect)> = vec![
                // (name, key, subject, subjectAltName, expected)
                ("openssl-subject-tenant", "ec", "/O=acme/CN=c2", "", Tenant("acme", "c2")),
                ("openssl-subject-admin", "ec", "/O=sluice:admin/CN=ops", "", Admin("ops")),
                ("openssl-spiffe-tenant", "ec", "/CN=ignored", "URI:spiffe://sluice/tenant/acme/c1", Tenant("acme", "c1")),
                ("openssl-spiffe-admin", "ec", "/O=acme/CN=c1", "URI:spiffe://sluice/admin/ops", Admin("ops")),
                ("openssl-spiffe-wrong-domain", "ec", "/O=acme/CN=c1", "URI:spiffe://prod/tenant/acme/c1", Refused),
                ("openssl-spiffe-no-path", "ec", "/O=acme/CN=c1", "URI:spiffe://sluice", Refused),
                ("openssl-spiffe-missing-client", "ec", "/O=acme/CN=c1", "URI:spiffe://sluice/tenant/acme", Refused),
                ("openssl-spiffe-extra-segment", "ec", "/CN=x", "URI:spiffe://sluice/admin/ops/extra", Refused),
                ("openssl-spiffe-bad-tenant", "ec", "/CN=x", "URI:spiffe://sluice/tenant/Acme/c1", Refused),
                ("openssl-spiffe-empty-client", "ec", "/CN=x", "URI:spiffe://sluice/tenant/acme/", Refused),
                ("openssl-sans-mixed", "ec", "/O=other/CN=x",
                 "URI:https://example.com/c3,URI:spiffe://sluice/tenant/acme/c3,URI:spiffe://sluice/admin/root,DNS:c3.example,email:c3@example.com,IP:127.0.0.1",
                 Tenant("acme", "c3")),
                ("openssl-dns-only", "ec", "/O=acme/CN=c9", "DNS:c9.example", Tenant("acme", "c9")),
                ("openssl-missing-o", "ec", "/CN=c4", "", Refused),
                ("openssl-missing-cn", "ec", "/O=acme", "", Refused),
                ("openssl-empty-subject", "ec", "/", "", Refused),
                ("openssl-bad-org", "ec", "/O=Acme Corp/CN=c5", "", Refused),
                ("openssl-bad-cn-leading-dash", "ec", "/O=acme/CN=-c5", "", Refused),
                ("openssl-repeated-attributes", "ec", "/O=acme/O=other/CN=c6/CN=c7", "", Tenant("acme", "c6")),
                ("openssl-utf8-org", "ec", "/O=acmé/CN=c8", "", Refused),
                ("openssl-cn-64", "ec", &subj_long, "", Refused),
                ("openssl-cn-63", "ec", &subj_longest, "", Tenant("acme", CN_63)),
                ("openssl-ed25519", "ed25519", "/O=acme/CN=ed", "", Tenant("acme", "ed")),
                ("openssl-rsa", "rsa", "/O=acme/CN=rsa", "URI:spiffe://sluice/tenant/acme/rsa", Tenant("acme", "rsa")),
            ];
            for (i, (name, key, subj, san, expect)) in cases.into_iter().enumerate() {
                let file = format!("c{i}.der");
                let key_args: &[&str] = match key {
                    "ec" => &ec,
                    "ed25519" => &["-newkey", "ed25519"],
                    _ => &["-newkey", "rsa:2048"],
                };
                let mut args: Vec<String> = ["req", "-x509", "-CA", "ca.pem", "-CAkey", "ca.key", "-utf8", "-nodes"]
                    .iter()
                    .chain(key_args)
                    .map(|s| s.to_string())
                    .collect();
                for a in ["-keyout", &format!("c{i}.key"), "-outform", "DER", "-out", &file, "-days", "2", "-subj", subj] {
                    args.push(a.into());
                }
                args.extend(["-addext".into(), "extendedKeyUsage=clientAuth".into()]);
                if !san.is_empty() {
                    args.extend(["-addext".into(), format!("subjectAltName={san}")]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                openssl(&o, &args);
                add(name, std::fs::read(o.join(&file)).unwrap(), expect);
            }
            out
        })
    }

    /// Every sample maps as documented; with `SLUICE_IDENTITY_CORPUS=<dir>`
    /// (relative to the workspace root) the samples are also written there
    /// as the `identity` fuzz target's seed corpus:
    /// `SLUICE_IDENTITY_CORPUS=host/fuzz/corpus/identity cargo test -p sluice --lib identity_seed`
    #[test]
    fn identity_seed_corpus_maps_as_expected() {
        for s in samples() {
            let got = check_everywhere(&s.der)
                .map(|p| (p.tenant, p.client, p.admin))
                .ok();
            let want = match s.expect {
                Tenant(t, c) => Some((t.to_string(), c.to_string(), false)),
                Admin(c) => Some((String::new(), c.to_string(), true)),
                Refused => None,
            };
            assert_eq!(got, want, "{}", s.name);
        }
        if let Some(dir) = std::env::var_os("SLUICE_IDENTITY_CORPUS") {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root");
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            for s in samples() {
                std::fs::write(dir.join(format!("{}.der", s.name)), &s.der).unwrap();
            }
            eprintln!("wrote {} seeds to {}", samples().len(), dir.display());
        }
    }

    /// Every strict prefix of a real certificate is refused as unparsable.
    #[test]
    fn truncated_certificates_are_refused() {
        for s in samples() {
            for len in 0..s.der.len() {
                for mode in MODES {
                    let r = identity_from_der(&s.der[..len], &mapping(mode, false));
                    assert!(
                        matches!(r, Err(IdentityError::Parse(_))),
                        "{} cut to {len} bytes: {r:?}",
                        s.name
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = check_everywhere(&bytes);
        }

        /// Bit flips, overwritten bytes, truncation and appended bytes on
        /// real certificates: no panic, and whatever is still accepted is a
        /// valid identity.
        #[test]
        fn damaged_certificates_never_panic(
            pick in any::<prop::sample::Index>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..8),
            sets in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            tail in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut der = pick.get(samples()).der.clone();
            for (at, mask) in flips {
                let i = at.index(der.len());
                der[i] ^= mask;
            }
            for (at, byte) in sets {
                let i = at.index(der.len());
                der[i] = byte;
            }
            if let Some(cut) = cut {
                der.truncate(cut.index(der.len()));
            }
            der.extend(tail);
            let _ = check_everywhere(&der);
        }
    }
}
