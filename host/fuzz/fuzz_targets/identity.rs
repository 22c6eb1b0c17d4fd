//! Any bytes given to the certificate identity parser as a DER certificate
//! never panic it, under every mapping mode, with and without an
//! `[identity] admins` list; every identity it accepts obeys the naming rules,
//! and the modes agree with each other:
//!
//! - a tenant client has a tenant and a client matching
//!   `[a-z0-9][a-z0-9_-]{0,62}`; an administrator has an empty tenant, a valid
//!   client name and, with an admins list, a listed one;
//! - `spiffe-then-subject` gives exactly what `spiffe-only` gives, or what
//!   `subject-only` gives when there is no SPIFFE URI;
//! - an identity from a SPIFFE URI is spelled by the certificate's first
//!   SPIFFE URI SAN, in the configured trust domain;
//! - the admins list only ever turns an unlisted administrator into a refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::plugins::Principal;
use sluice::tls::{IdentityError, IdentityMapping, MappingMode, identity_from_der};

const ADMINS: [&str; 2] = ["admin", "ops"];

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && matches!(b, b'_' | b'-'))
        })
}

fn check(p: &Principal, m: &IdentityMapping) {
    assert!(valid_name(&p.client), "client `{}`", p.client);
    if p.admin {
        assert!(
            p.tenant.is_empty(),
            "administrator with tenant `{}`",
            p.tenant
        );
        if let Some(list) = &m.admins {
            assert!(
                list.contains(&p.client),
                "unlisted administrator `{}`",
                p.client
            );
        }
    } else {
        assert!(valid_name(&p.tenant), "tenant `{}`", p.tenant);
    }
}

fn mapping(mode: MappingMode, admins: bool) -> IdentityMapping {
    IdentityMapping {
        mode,
        admins: admins.then(|| ADMINS.iter().map(|s| s.to_string()).collect()),
        ..IdentityMapping::default()
    }
}

fn run(der: &[u8], mode: MappingMode, admins: bool) -> Result<Principal, IdentityError> {
    let m = mapping(mode, admins);
    let r = identity_from_der(der, &m);
    if let Ok(p) = &r {
        check(p, &m);
    }
    r
}

fuzz_target!(|der: &[u8]| {
    for admins in [false, true] {
        let spiffe = run(der, MappingMode::SpiffeOnly, admins);
        let subject = run(der, MappingMode::SubjectOnly, admins);
        let both = run(der, MappingMode::SpiffeThenSubject, admins);

        let no_uri = Err(IdentityError::NoIdentity("no SPIFFE URI SAN".into()));
        let expected = if spiffe == no_uri { &subject } else { &spiffe };
        assert_eq!(&both, expected, "modes disagree");

        if let Ok(p) = &spiffe {
            let first = p.sans.iter().find(|s| s.starts_with("URI:spiffe://"));
            let want = if p.admin {
                format!("URI:spiffe://sluice/admin/{}", p.client)
            } else {
                format!("URI:spiffe://sluice/tenant/{}/{}", p.tenant, p.client)
            };
            assert_eq!(
                first,
                Some(&want),
                "SPIFFE identity not spelled by the first URI"
            );
        }
    }
    // The admins list refuses unlisted administrators and changes nothing else.
    for mode in [
        MappingMode::SpiffeThenSubject,
        MappingMode::SpiffeOnly,
        MappingMode::SubjectOnly,
    ] {
        let open = identity_from_der(der, &mapping(mode, false));
        let listed = identity_from_der(der, &mapping(mode, true));
        match &open {
            Ok(p) if p.admin && !ADMINS.contains(&p.client.as_str()) => {
                assert!(listed.is_err(), "unlisted administrator accepted")
            }
            _ => assert_eq!(
                listed, open,
                "admins list changed a non-administrator result"
            ),
        }
    }
});
