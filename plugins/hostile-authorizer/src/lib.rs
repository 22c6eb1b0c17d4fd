//! An authorizer that fails on demand, to prove the broker fails closed.
//!
//! Config (for `init`):
//! - `mode=allow|trap|error|deny-all|spin` (default `allow`): `trap` runs
//!   the wasm `unreachable` instruction, `error` panics (the guest's own
//!   failure, reported with its message), `deny-all` denies with
//!   `denied by hostile-authorizer`, `spin` loops forever (the call deadline
//!   must stop it);
//! - `on=ACTION` (optional: connect, publish, subscribe, declare, bind,
//!   delete, purge, admin, manage-policy): the mode applies to that action
//!   only; every other question is allowed;
//! - `init=error`: `init` refuses, so the load fails.

use std::hint::black_box;

use sluice_plugin::{Action, Authorizer, Config, Decision, Principal, Resource};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Allow,
    Trap,
    Error,
    DenyAll,
    Spin,
}

struct HostileAuthorizer {
    mode: Mode,
    on: Option<Action>,
}

fn action(name: &str) -> Option<Action> {
    Some(match name {
        "connect" => Action::Connect,
        "publish" => Action::Publish,
        "subscribe" => Action::Subscribe,
        "declare" => Action::Declare,
        "bind" => Action::Bind,
        "delete" => Action::Delete,
        "purge" => Action::Purge,
        "admin" => Action::Admin,
        "manage-policy" => Action::ManagePolicy,
        _ => return None,
    })
}

impl Authorizer for HostileAuthorizer {
    fn init(config: Config) -> Result<Self, String> {
        if config.get("init") == Some("error") {
            return Err("init refused by config".into());
        }
        let mode = match config.get("mode").unwrap_or("allow") {
            "allow" => Mode::Allow,
            "trap" => Mode::Trap,
            "error" => Mode::Error,
            "deny-all" => Mode::DenyAll,
            "spin" => Mode::Spin,
            other => return Err(format!("config key `mode`: unknown value `{other}`")),
        };
        let on = match config.get("on") {
            None => None,
            Some(name) => Some(
                action(name).ok_or_else(|| format!("config key `on`: unknown action `{name}`"))?,
            ),
        };
        Ok(HostileAuthorizer { mode, on })
    }

    fn authorize(&mut self, _who: &Principal, what: Action, _on: &Resource) -> Decision {
        if self.on.is_some_and(|a| a != what) {
            return Decision::Allow;
        }
        match self.mode {
            Mode::Allow => Decision::Allow,
            Mode::DenyAll => Decision::Deny("denied by hostile-authorizer".into()),
            Mode::Trap => trap(),
            Mode::Error => panic!("hostile authorizer error"),
            Mode::Spin => {
                let mut i = 0u64;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
        }
    }
}

/// The wasm `unreachable` instruction (a plain abort elsewhere, so the
/// crate still builds and tests on the host).
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

sluice_plugin::export_authorizer!(HostileAuthorizer);
