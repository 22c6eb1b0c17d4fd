//! Logging through the broker. Lines reach the broker's log with the plugin
//! name and tenant attached.

use crate::__private::host;
use crate::__private::types::LogLevel;

/// Log at trace level.
pub fn trace(text: &str) {
    host::log(LogLevel::Trace, text);
}

/// Log at debug level.
pub fn debug(text: &str) {
    host::log(LogLevel::Debug, text);
}

/// Log at info level.
pub fn info(text: &str) {
    host::log(LogLevel::Info, text);
}

/// Log at warn level.
pub fn warn(text: &str) {
    host::log(LogLevel::Warn, text);
}

/// Log at error level.
pub fn error(text: &str) {
    host::log(LogLevel::Error, text);
}
