//! Layered configuration: a TOML text, overridden by environment variables.
//!
//! Pure functions: the binary reads the file and the process environment and passes them
//! in, so tests pass values and never touch the process environment.
//!
//! An override `PREFIX__SECTION__FIELD=value` sets `[section] field = value`: names are
//! lowercased, `__` separates levels, and the value is read as a TOML value when it is one
//! (`8`, `true`, `"text"`, `[1, 2]`) and as a plain string otherwise (`/var/lib/caretwin`).

use crate::{Error, Result};
use serde::de::DeserializeOwned;

/// Parses `toml_text`, applies the overrides among `env` that start with `prefix` followed
/// by `__`, and deserializes the result. Unknown fields are reported if `T` denies them.
pub fn load<T: DeserializeOwned>(
    toml_text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    prefix: &str,
) -> Result<T> {
    let mut table: toml::Table = toml_text
        .parse()
        .map_err(|e: toml::de::Error| Error::Config(e.to_string().trim_end().to_owned()))?;
    let marker = format!("{prefix}__");
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(&marker) else {
            continue;
        };
        let path: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(Error::Config(format!(
                "environment variable {name} has an empty level"
            )));
        }
        set(&mut table, &path, parse_value(&raw), &name)?;
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| Error::Config(e.to_string().trim_end().to_owned()))
}

/// Reads an override's value: a TOML value if it is one, else the text itself.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value, var: &str) -> Result<()> {
    let (last, parents) = path.split_last().expect("split on a non-empty path");
    let mut cur = table;
    for p in parents {
        let next = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = next
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("{var} overrides {p:?}, which is not a table")))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        name: String,
        store: Store,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Store {
        path: String,
        #[serde(default)]
        group: u32,
        #[serde(default)]
        sync: bool,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_the_file() {
        let text = "name = \"a\"\n[store]\npath = \"/data\"\ngroup = 4\n";
        let c: Conf = load(
            text,
            env(&[
                ("CT__STORE__PATH", "/var/lib/x"),
                ("CT__STORE__GROUP", "64"),
                ("CT__STORE__SYNC", "true"),
                ("OTHER__NAME", "ignored"),
            ]),
            "CT",
        )
        .unwrap();
        assert_eq!(c.name, "a");
        assert_eq!(
            c.store,
            Store {
                path: "/var/lib/x".into(),
                group: 64,
                sync: true
            }
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let bad_toml = load::<Conf>("name = ", env(&[]), "CT").unwrap_err();
        assert!(matches!(bad_toml, Error::Config(_)));
        let unknown = load::<Conf>(
            "name = \"a\"\nbogus = 1\n[store]\npath = \"p\"",
            env(&[]),
            "CT",
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("bogus"), "{unknown}");
        let wrong_type = load::<Conf>(
            "name = \"a\"\n[store]\npath = \"p\"",
            env(&[("CT__STORE__GROUP", "many")]),
            "CT",
        )
        .unwrap_err();
        assert!(wrong_type.to_string().contains("group"), "{wrong_type}");
        let not_table = load::<Conf>(
            "name = \"a\"\n[store]\npath = \"p\"",
            env(&[("CT__NAME__X", "1")]),
            "CT",
        )
        .unwrap_err();
        assert!(not_table.to_string().contains("CT__NAME__X"), "{not_table}");
    }
}
