//! `sluice plugin new`: a plugin crate from a template.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::plugins::PluginKind;

/// Where the guest SDK lives in this source tree (used for the path dependency).
fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/plugin")
}

fn lib_rs(kind: PluginKind, name: &str) -> String {
    let ty: String = name
        .split(['-', '_'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect();
    match kind {
        PluginKind::Router => format!(
            r#"//! `{name}`: a Sluice router.
//!
//! Config: `extra=QUEUE` adds QUEUE to the targets of messages carrying the
//! header `x-extra`.

use sluice_plugin::{{Config, Message, Router}};

struct {ty} {{
    extra: Option<String>,
}}

impl Router for {ty} {{
    fn init(config: Config) -> Result<Self, String> {{
        Ok(Self {{ extra: config.get("extra").map(str::to_string) }})
    }}

    fn route(&mut self, msg: &Message, mut candidates: Vec<String>) -> Result<Vec<String>, String> {{
        if let (Some(q), Some(_)) = (&self.extra, msg.header("x-extra")) {{
            candidates.push(q.clone());
        }}
        Ok(candidates)
    }}
}}

sluice_plugin::export_router!({ty});
"#
        ),
        PluginKind::Filter => format!(
            r#"//! `{name}`: a Sluice filter.
//!
//! Config: `header=NAME` (default `drop`): messages carrying that header are dropped.

use sluice_plugin::{{Config, Filter, FilterVerdict, Message}};

struct {ty} {{
    header: String,
}}

impl Filter for {ty} {{
    fn init(config: Config) -> Result<Self, String> {{
        Ok(Self {{ header: config.get("header").unwrap_or("drop").to_string() }})
    }}

    fn filter(&mut self, msg: &Message) -> Result<FilterVerdict, String> {{
        Ok(match msg.header(&self.header) {{
            Some(_) => FilterVerdict::Drop(format!("header {{}} present", self.header)),
            None => FilterVerdict::Accept,
        }})
    }}
}}

sluice_plugin::export_filter!({ty});
"#
        ),
        PluginKind::Authorizer => format!(
            r#"//! `{name}`: a Sluice authorizer.
//!
//! Config: `readonly=CLIENT` (repeatable): those clients may only connect and subscribe.

use sluice_plugin::{{Action, Authorizer, Config, Decision, Principal, Resource}};

struct {ty} {{
    readonly: Vec<String>,
}}

impl Authorizer for {ty} {{
    fn init(config: Config) -> Result<Self, String> {{
        Ok(Self {{ readonly: config.get_all("readonly").map(str::to_string).collect() }})
    }}

    fn authorize(&mut self, who: &Principal, action: Action, _resource: &Resource) -> Decision {{
        let reads = matches!(action, Action::Connect | Action::Subscribe);
        if self.readonly.contains(&who.client) && !reads {{
            Decision::Deny(format!("{{}} is read-only", who.client))
        }} else {{
            Decision::Allow
        }}
    }}
}}

sluice_plugin::export_authorizer!({ty});
"#
        ),
    }
}

/// Create `dir` (its file name is the crate name) with a plugin of `kind`.
/// Inside a Sluice checkout's `plugins/` folder the crate joins the
/// workspace; anywhere else it is standalone, with its own build settings.
pub(crate) fn new_plugin(
    dir: &Path,
    kind: PluginKind,
    sdk: Option<&Path>,
) -> anyhow::Result<String> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the plugin folder needs a name")?
        .to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        || name.starts_with(['-', '_'])
    {
        bail!("plugin name `{name}` must be lowercase letters, digits, `-` or `_`");
    }
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parent = parent
        .canonicalize()
        .with_context(|| format!("{} does not exist", parent.display()))?;
    let in_workspace = parent.file_name().is_some_and(|n| n == "plugins")
        && parent.join("../sdk/plugin/Cargo.toml").exists();
    let sdk = match sdk {
        Some(p) => p.to_path_buf(),
        None => default_sdk(),
    };
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the guest SDK is not at {} (pass --sdk PATH to sdk/plugin of a Sluice checkout)",
            sdk.display()
        )
    })?;
    std::fs::create_dir_all(dir.join("src"))?;
    let manifest = if in_workspace {
        format!(
            "[package]\nname = \"{name}\"\ndescription = \"A Sluice {kind} plugin\"\nversion.workspace = true\nedition.workspace = true\nlicense.workspace = true\npublish = false\n\n[lib]\ncrate-type = [\"cdylib\", \"rlib\"]\n\n[dependencies]\nsluice-plugin.workspace = true\n"
        )
    } else {
        std::fs::create_dir_all(dir.join(".cargo"))?;
        std::fs::write(
            dir.join(".cargo/config.toml"),
            "[build]\ntarget = \"wasm32-unknown-unknown\"\n\n[target.wasm32-unknown-unknown]\nlinker = \"wasm-component-ld\"\n",
        )?;
        format!(
            "[package]\nname = \"{name}\"\ndescription = \"A Sluice {kind} plugin\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nsluice-plugin = {{ path = {:?} }}\n\n# A standalone crate: not part of another workspace.\n[workspace]\n\n[profile.release]\nlto = true\ncodegen-units = 1\nstrip = \"debuginfo\"\npanic = \"abort\"\n",
            sdk.display().to_string()
        )
    };
    std::fs::write(dir.join("Cargo.toml"), manifest)?;
    std::fs::write(dir.join("src/lib.rs"), lib_rs(kind, &name))?;
    let artifact = name.replace('-', "_");
    Ok(if in_workspace {
        format!(
            "created {} (workspace member; bundled by the next build)\nbuild:  cargo build --profile plugin --target wasm32-unknown-unknown -p {name}\ntest:   sluice plugin test target/wasm32-unknown-unknown/plugin/{artifact}.wasm --kind {kind}",
            dir.display()
        )
    } else {
        format!(
            "created {}\nbuild:  cd {} && cargo build --release\ntest:   sluice plugin test {}/target/wasm32-unknown-unknown/release/{artifact}.wasm --kind {kind}\nload:   sluice plugin load {}/target/wasm32-unknown-unknown/release/{artifact}.wasm --kind {kind}{}",
            dir.display(),
            dir.display(),
            dir.display(),
            dir.display(),
            if kind == PluginKind::Filter {
                " --queue QUEUE"
            } else {
                ""
            }
        )
    })
}
