//! CareTwin's end-to-end test harness: start the real binaries as processes, wait for
//! what they report, signal them, and read what they printed.
//!
//! Waits are explicit — for a line on a process's output or for its exit — with a
//! generous deadline that only turns a hang into a failure; no test sleeps and hopes.
//!
//! # Layout
//! - [`Process`] — a running binary with its output captured line by line.
//! - [`machine`] — what benchmarks print about the machine they ran on.
//! - [`bin`] — the path of a workspace binary, built next to the tests.
//! - [`postgres`] — a real PostgreSQL server and a fresh database per test.
//! - [`relay`] — a TCP relay (a server reached from another network namespace).
//! - [`cluster`] — a cluster of node processes with simulated sites, and the checks on
//!   the shards they hosted (single activation).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod postgres;
pub mod relay;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any single wait may take before the test fails as hung.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Which stream a captured line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error (logs).
    Stderr,
}

/// A running binary whose stdout and stderr are captured line by line.
pub struct Process {
    name: String,
    child: Child,
    lines: mpsc::Receiver<(Stream, String)>,
    seen: Vec<(Stream, String)>,
}

impl Process {
    /// Starts `exe` with `args` and extra environment `env` (no colours in logs).
    pub fn start(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_in(None, exe, args, env)
    }

    /// Like [`Process::start`], in working directory `dir` when given.
    pub fn start_in(
        dir: Option<&Path>,
        exe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(exe);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let name = exe
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into());
        Self::spawn(&name, cmd)
    }

    /// Starts a prepared command (e.g. one that runs the binary in another network
    /// namespace), named `name` in failure messages; no colours in logs, no `RUST_LOG`
    /// from the test's environment.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for (stream, reader) in [
            (
                Stream::Stdout,
                Box::new(stdout) as Box<dyn std::io::Read + Send>,
            ),
            (Stream::Stderr, Box::new(stderr)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line containing `needle` appears on either stream; returns it.
    pub fn wait_for(&mut self, needle: &str) -> anyhow::Result<String> {
        if let Some((_, l)) = self.seen.iter().find(|(_, l)| l.contains(needle)) {
            return Ok(l.clone());
        }
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((stream, line)) => {
                    self.seen.push((stream, line.clone()));
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    anyhow::bail!(
                        "{}: no line with {needle:?} in {DEADLINE:?}; saw:\n{}",
                        self.name,
                        self.transcript()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!(
                        "{}: exited without printing {needle:?}; saw:\n{}",
                        self.name,
                        self.transcript()
                    )
                }
            }
        }
    }

    /// Takes in every line printed so far, without waiting (for tests that watch
    /// [`Process::output`] until a condition holds).
    pub fn poll(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Sends SIGINT (what Ctrl-C in a terminal sends).
    pub fn interrupt(&self) -> anyhow::Result<()> {
        self.signal("INT")
    }

    /// Sends SIGTERM (a graceful stop request).
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM")
    }

    /// Sends SIGKILL (no cleanup at all).
    pub fn kill(&self) -> anyhow::Result<()> {
        self.signal("KILL")
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} {} failed", self.pid());
        Ok(())
    }

    /// Waits for the process to exit and collects the rest of its output.
    pub fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // The reader threads end at EOF; take what is left.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(l);
                }
                return Ok(status);
            }
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => self.seen.push(l),
                Err(_) if Instant::now() < until => {}
                Err(_) => {
                    let _ = self.child.kill();
                    anyhow::bail!("{} did not exit within {DEADLINE:?}", self.name);
                }
            }
        }
    }

    /// Every line seen so far from `stream`.
    pub fn output(&self, stream: Stream) -> Vec<&str> {
        self.seen
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l.as_str())
            .collect()
    }

    /// Everything seen so far, for failure messages.
    pub fn transcript(&self) -> String {
        self.seen
            .iter()
            .map(|(s, l)| format!("[{s:?}] {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A test that failed half-way must not leave its processes behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The machine, as benchmarks print it: CPU model, cores, kernel, load average now.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cpu}, {cores} cores, Linux {}, load average {}",
        kernel.trim(),
        load.join(" ")
    )
}

/// The path of workspace binary `name` (`caretwin-cluster`, `caretwin-edge`…), in the
/// target directory the running test was built in. `scripts/test.sh` builds every binary
/// before the tests; run `cargo build --workspace --bins` first when running tests alone.
pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The value of field `name` in a log line (`name=value`, colours stripped), if it has it.
pub fn log_field(line: &str, name: &str) -> Option<String> {
    strip_ansi(line)
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
}

/// `line` without ANSI colour sequences (log lines of a process that coloured them).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the end of the escape sequence (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
