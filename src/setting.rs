//! A setting that cannot be used, said the same way by every module that reads its own
//! settings (the connection URLs, the consumer's mappings and rules, the Kafka and API
//! settings): which key, what is wrong, what was expected. `config` composes them.

use std::path::PathBuf;

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One key has a bad value.
    #[error("configuration key {key}: {reason}")]
    Invalid {
        /// Where the value came from (`DB_URL`, `warehouses[0].url`, …).
        key: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// The TOML file could not be read or parsed.
    #[error("configuration file {path}: {reason}")]
    File {
        /// File path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A [`ConfigError::Invalid`] for `key`.
pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}
