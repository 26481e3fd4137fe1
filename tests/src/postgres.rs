//! A real PostgreSQL server for tests and benchmarks, with one fresh database per test.
//!
//! `scripts/test.sh` starts a throwaway server (`scripts/postgres.sh start`) and exports
//! its URL as `CARETWIN_TEST_PG_URL`. Without it — `cargo test` by hand — the first test
//! that asks starts one itself with `scripts/postgres.sh ensure <dir>`, which every test
//! process then shares; that server keeps running after the tests, for the next run
//! (`scripts/postgres.sh remove <dir>` stops it). Either way the tests run against a
//! real server; none passes without one.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that names a running server (`postgres://user@host:port/db`,
/// a user allowed to create databases).
pub const URL_VAR: &str = "CARETWIN_TEST_PG_URL";

/// Databases made by [`fresh_database`] are named `ct_<unix seconds>_<pid>_<n>`; those
/// older than this are dropped by later runs on a shared server.
const STALE_AFTER_S: u64 = 6 * 3600;

/// `scripts/postgres.sh` in this workspace.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh")
}

/// Runs `scripts/postgres.sh` with `args` and returns the settings it printed
/// (`CARETWIN_TEST_PG_URL`, `CARETWIN_TEST_PG_DIR`).
fn run_script(args: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .with_context(|| format!("running {} {args:?}", script().display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed ({}): {}",
            script().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn setting(settings: &[(String, String)], key: &str) -> anyhow::Result<String> {
    settings
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .with_context(|| format!("scripts/postgres.sh printed no {key}"))
}

/// The URL of the test server: `CARETWIN_TEST_PG_URL` when set, else a server in
/// `dir` that this call starts unless it already runs (shared by every test process
/// that passes the same `dir`). Panics, saying why, when no server can be had: a
/// PostgreSQL test never passes without one.
pub fn server_url(dir: &Path) -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var(URL_VAR)
            && !url.is_empty()
        {
            return url;
        }
        let dir = dir.to_str().expect("a UTF-8 directory");
        run_script(&["ensure", dir])
            .and_then(|s| setting(&s, URL_VAR))
            .unwrap_or_else(|e| {
                panic!(
                    "no PostgreSQL server for the tests: {e:#}\n\
                     run `bash scripts/test.sh`, or set {URL_VAR} to a server's URL"
                )
            })
    })
    .clone()
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The host and port of `url` (`postgres://user@host:port/db`), if it names an IP
/// address and a port.
pub fn address(url: &str) -> Option<std::net::SocketAddr> {
    let (start, end) = authority(url);
    let host_port = url[start..end].rsplit('@').next()?;
    host_port.parse().ok()
}

/// `url` with its host and port replaced by `addr` (e.g. a relay's).
pub fn with_address(url: &str, addr: std::net::SocketAddr) -> String {
    let (start, end) = authority(url);
    let user = url[start..end]
        .rsplit_once('@')
        .map_or(String::new(), |(u, _)| format!("{u}@"));
    format!("{}{user}{addr}{}", &url[..start], &url[end..])
}

/// Where the authority (`user@host:port`) of `url` starts and ends.
fn authority(url: &str) -> (usize, usize) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    (start, end)
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        // The connection ends when the client is dropped.
        let _ = connection.await;
    });
    Ok(client)
}

/// Creates a new, empty database on the server at `server_url` and returns its name
/// and URL. Old test databases left on a shared server are dropped on the way.
pub async fn fresh_database(server_url: &str) -> anyhow::Result<(String, String)> {
    static N: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let name = format!(
        "ct_{now}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let admin = connect(server_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("creating database {name}"))?;
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'ct\\_%'",
            &[],
        )
        .await?;
    for row in rows {
        let old: String = row.get(0);
        let created = old
            .split('_')
            .nth(1)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(now);
        if created + STALE_AFTER_S < now {
            // Another process may be dropping it too; either way it goes.
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {old} WITH (FORCE)"))
                .await;
        }
    }
    Ok((name.clone(), with_database(server_url, &name)))
}

/// Ends every connection to database `db` from the server side, as a crashed client
/// or a network cut would: their open transactions roll back, committed ones stay.
pub async fn terminate_connections(server_url: &str, db: &str) -> anyhow::Result<u64> {
    let admin = connect(server_url).await?;
    let row = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// A server of one's own, for a test that crashes it; removed when dropped.
pub struct PrivateServer {
    dir: String,
    url: String,
}

impl PrivateServer {
    /// Starts a new server in a new temporary directory.
    pub fn start() -> anyhow::Result<Self> {
        let s = run_script(&["start"])?;
        Ok(Self {
            dir: setting(&s, "CARETWIN_TEST_PG_DIR")?,
            url: setting(&s, URL_VAR)?,
        })
    }

    /// Its URL (database `postgres`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server the way a power cut would leave it: `pg_ctl stop -m immediate`
    /// ends every process without a checkpoint; the next start replays the WAL.
    pub fn crash(&self) -> anyhow::Result<()> {
        run_script(&["stop", &self.dir, "immediate"]).map(drop)
    }

    /// Starts it again on the same port and data.
    pub fn restart(&self) -> anyhow::Result<()> {
        let s = run_script(&["start", &self.dir])?;
        anyhow::ensure!(
            setting(&s, URL_VAR)? == self.url,
            "the server came back on another port"
        );
        Ok(())
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = run_script(&["remove", &self.dir]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_and_replaced() {
        let url = "postgres://caretwin@127.0.0.1:5433/ct_1?connect_timeout=3";
        assert_eq!(address(url), Some("127.0.0.1:5433".parse().unwrap()));
        assert_eq!(
            with_address(url, "198.18.0.1:7000".parse().unwrap()),
            "postgres://caretwin@198.18.0.1:7000/ct_1?connect_timeout=3"
        );
        assert_eq!(
            with_address("postgres://h:1", "10.0.0.1:2".parse().unwrap()),
            "postgres://10.0.0.1:2"
        );
        assert_eq!(address("postgres://u@db.example:5432/x"), None);
    }

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5/postgres", "ct_1"),
            "postgres://u@h:5/ct_1"
        );
        assert_eq!(with_database("postgres://u@h:5", "d"), "postgres://u@h:5/d");
        assert_eq!(
            with_database("postgresql://u:p@h/x?connect_timeout=3", "d"),
            "postgresql://u:p@h/d?connect_timeout=3"
        );
    }
}
