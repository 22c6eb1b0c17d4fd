//! placeholder
use sluice_plugin::{Config, Message, Router};
struct R;
impl Router for R {
    fn init(_c: Config) -> Result<Self, String> {
        Ok(R)
    }
    fn route(&mut self, _m: &Message, c: Vec<String>) -> Result<Vec<String>, String> {
        Ok(c)
    }
}
sluice_plugin::export_router!(R);
