//! Checks a component against the contract before it is linked, so that a
//! wrong file gets an error that says what is wrong and how to fix it.

use wasmtime::Engine;
use wasmtime::component::Component;

use super::bindings::{Abi, WIT_PACKAGE};
use super::{LoadError, PluginKind};

/// The binary layer of a wasm file: core module or component.
pub(crate) fn check_header(wasm: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8; 4] = b"\0asm";
    match wasm.get(..8) {
        Some(h) if &h[..4] == MAGIC && h[6..8] == [1, 0] => Ok(()),
        Some(h) if &h[..4] == MAGIC && h[6..8] == [0, 0] => Err(LoadError::NotAComponent(
            "this is a core wasm module, not a component: build the plugin for \
             wasm32-unknown-unknown with `wasm-component-ld` as linker (see README, \
             \"Writing a plugin\")"
                .into(),
        )),
        _ => Err(LoadError::NotAComponent(
            "not a WebAssembly file (bad magic number)".into(),
        )),
    }
}

/// Split `ns:pkg/iface@ver` into (`ns:pkg`, `iface`, `ver`).
fn split_interface(name: &str) -> Option<(&str, &str, Option<&str>)> {
    let (pkg, rest) = name.split_once('/')?;
    match rest.split_once('@') {
        Some((iface, ver)) => Some((pkg, iface, Some(ver))),
        None => Some((pkg, rest, None)),
    }
}

/// Check imports and exports of a compiled component for `kind`, and tell
/// which contract version its sluice imports name (`None` when it imports
/// nothing from `sluice:plugin`: then only the types of its exports tell).
pub(crate) fn check_contract(
    engine: &Engine,
    component: &Component,
    kind: PluginKind,
) -> Result<Option<Abi>, LoadError> {
    let ty = component.component_type();
    // The first sluice import, with the ABI it names.
    let mut abi: Option<(Abi, &str)> = None;
    for (name, _) in ty.imports(engine) {
        let (iface, ver) = match split_interface(name) {
            Some((WIT_PACKAGE, iface, ver)) => (iface, ver),
            _ => {
                return Err(LoadError::ForbiddenImport {
                    import: name.to_string(),
                });
            }
        };
        let Some(found) = ver.and_then(Abi::from_version) else {
            return Err(LoadError::WrongVersion {
                found: ver.unwrap_or("(unversioned)").to_string(),
                import: name.to_string(),
            });
        };
        if !matches!(iface, "host" | "types") {
            return Err(LoadError::ForbiddenImport {
                import: name.to_string(),
            });
        }
        match abi {
            Some((first, first_name)) if first != found => {
                return Err(LoadError::MixedVersions {
                    first: first_name.to_string(),
                    second: name.to_string(),
                });
            }
            Some(_) => {}
            None => abi = Some((found, name)),
        }
    }
    let exports: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
    let missing: Vec<&str> = kind
        .exports()
        .iter()
        .copied()
        .filter(|e| !exports.contains(e))
        .collect();
    if !missing.is_empty() {
        let looks_like = PluginKind::ALL
            .into_iter()
            .find(|k| k.exports().iter().all(|e| exports.contains(e)));
        return Err(LoadError::WrongKind {
            expected: kind,
            missing: missing.join(", "),
            looks_like,
            exports: exports.join(", "),
        });
    }
    Ok(abi.map(|(a, _)| a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_split() {
        assert_eq!(
            split_interface("sluice:plugin/host@0.1.0"),
            Some(("sluice:plugin", "host", Some("0.1.0")))
        );
        assert_eq!(
            split_interface("wasi:io/poll"),
            Some(("wasi:io", "poll", None))
        );
        assert_eq!(split_interface("log"), None);
    }

    #[test]
    fn headers_are_checked() {
        assert!(check_header(b"\0asm\x0d\0\x01\0rest").is_ok());
        let core = check_header(b"\0asm\x01\0\0\0").unwrap_err().to_string();
        assert!(core.contains("core wasm module"), "{core}");
        let junk = check_header(b"hello world").unwrap_err().to_string();
        assert!(junk.contains("magic"), "{junk}");
        assert!(check_header(b"").is_err());
    }
}
