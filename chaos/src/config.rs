//! The chaos tool's configuration: a TOML file with `CARETWIN_CHAOS__…` overrides.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Prefix of the environment overrides (`CARETWIN_CHAOS__WORK_DIR=/tmp/chaos`).
pub const ENV_PREFIX: &str = "CARETWIN_CHAOS";

/// Settings of the chaos tool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    /// Where scenarios keep the state of the processes they start; each run uses a fresh
    /// subdirectory.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    /// Concurrent writers in store crash scenarios.
    #[serde(default = "default_writers")]
    pub writers: usize,
}

fn default_work_dir() -> PathBuf {
    std::env::temp_dir().join("caretwin-chaos")
}
fn default_writers() -> usize {
    64
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            work_dir: default_work_dir(),
            writers: default_writers(),
        }
    }
}

impl ChaosConfig {
    /// Loads the configuration from a TOML text and environment overrides.
    pub fn load(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> caretwin_actors::Result<Self> {
        let c: Self = caretwin_actors::settings::load(toml_text, env, ENV_PREFIX)?;
        if c.writers == 0 || c.writers > 10_000 {
            return Err(caretwin_actors::Error::Config(format!(
                "writers {} is outside 1..=10000",
                c.writers
            )));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_with_overrides() {
        let c = ChaosConfig::load(
            "writers = 8",
            [(
                "CARETWIN_CHAOS__WORK_DIR".to_string(),
                "/srv/chaos".to_string(),
            )],
        )
        .unwrap();
        assert_eq!((c.writers, c.work_dir), (8, PathBuf::from("/srv/chaos")));
        assert!(ChaosConfig::load("writers = 0", []).is_err());
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../deploy/config/chaos.toml");
        let c = ChaosConfig::load(text, []).unwrap();
        assert_eq!(c.writers, ChaosConfig::default().writers);
    }
}
