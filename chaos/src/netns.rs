//! A real network partition: a Linux network namespace joined to the machine's own by a
//! veth pair, which can be cut and healed.
//!
//! A process started in the namespace ([`Netns::command`]) reaches the root namespace only
//! over the pair: the host side has one address, the namespace side another, in one small
//! subnet. Everything else on the machine (other nodes, a relay to the store) stays in the
//! root namespace, so root ↔ namespace traffic is local delivery (netfilter's INPUT and
//! OUTPUT), never forwarding: no bridge, and nothing that Docker's `FORWARD` policy
//! `DROP` or `br_netfilter` would touch.
//!
//! [`Netns::cut`] drops every packet *arriving* over the pair, on both sides (an nftables
//! table per side, hooked on input and matching only this pair's interface). Senders get no
//! error and no reset: their packets leave and vanish, as on a real partition, and TCP
//! connections resume with retransmissions after [`Netns::heal`]. Taking the link down
//! instead would not do: the kernel then routes the namespace's addresses out of the
//! default route, where something else may answer.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables). [`Error::Unavailable`] says which is
//! missing, so a test can tell "cannot run here" from "failed". Names and addresses are
//! derived from the process id ([`Netns::create_unique`]), so parallel runs and leftovers
//! of a killed run do not collide; dropping a [`Netns`] removes the namespace, the pair and
//! the rules, also when a test panics.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Why a namespace could not be made, cut or healed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Network namespaces cannot be used here (not root, or a tool is missing).
    #[error("network namespaces unavailable: {0}")]
    Unavailable(String),
    /// A request was malformed; nothing was changed.
    #[error("invalid network namespace request: {0}")]
    Invalid(String),
    /// A command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Result of the namespace operations.
pub type Result<T> = std::result::Result<T, Error>;

/// The block unique namespaces take their addresses from: 198.18.0.0/15, reserved for
/// network benchmarks (RFC 2544), so it is not some real network's.
const UNIQUE_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// /30 blocks in the /15.
const UNIQUE_BLOCKS: u32 = 1 << 15;

/// How long a new pair may take to come up.
const LINK_UP: Duration = Duration::from_secs(5);

/// A network namespace with a veth pair to the root namespace. Dropped: removed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_if: String,
    host_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
    cut: bool,
}

impl Netns {
    /// Checks that namespaces can be made here: root, `ip` and `nft`.
    pub fn check() -> Result<()> {
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| Error::Unavailable(format!("cannot read /proc/self/status: {e}")))?;
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .ok_or_else(|| Error::Unavailable("no Uid line in /proc/self/status".into()))?;
        if euid != "0" {
            return Err(Error::Unavailable(format!(
                "namespaces and firewall rules need root; running as uid {euid}"
            )));
        }
        for (tool, arg, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
            match Command::new(tool).arg(arg).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return Err(Error::Unavailable(format!(
                        "`{tool} {arg}` failed ({}): {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    )));
                }
                Err(e) => {
                    return Err(Error::Unavailable(format!(
                        "`{tool}` cannot be run ({e}); install {package}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Makes namespace `name` (1 to 13 lowercase letters and digits, starting with a
    /// letter) with a veth pair `<name>h` (host side, `host_addr`) and `<name>n`
    /// (namespace side, `ns_addr`), both in one subnet of `prefix` bits (8 to 30), and
    /// `lo` up in the namespace. Refused, changing nothing, if the name or an address is
    /// already in use.
    pub fn create(name: &str, host_addr: Ipv4Addr, ns_addr: Ipv4Addr, prefix: u8) -> Result<Self> {
        validate(name, host_addr, ns_addr, prefix)?;
        Self::check()?;
        let existing = run(Command::new("ip").args(["netns", "list"]))?;
        if existing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
        {
            return Err(Error::Invalid(format!("namespace {name} exists already")));
        }
        let host_if = format!("{name}h");
        if Command::new("ip")
            .args(["link", "show", &host_if])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Err(Error::Invalid(format!(
                "interface {host_if} exists already"
            )));
        }
        for addr in [host_addr, ns_addr] {
            if address_in_use(addr)? {
                return Err(Error::Invalid(format!("address {addr} is in use already")));
            }
        }
        // A table of a killed run of the same name matches nothing now, but would clash.
        let _ = run(Command::new("nft").args(["delete", "table", "inet", &table(name)]));

        // The first thing that needs the kernel's permission: refused, namespaces are
        // unavailable here (a container without CAP_NET_ADMIN, say), not broken.
        run(Command::new("ip").args(["netns", "add", name]))
            .map_err(|e| Error::Unavailable(format!("cannot make a network namespace: {e}")))?;
        // From here on, dropping `ns` undoes whatever was made.
        let ns = Self {
            name: name.to_owned(),
            host_if,
            host_addr,
            ns_addr,
            cut: false,
        };
        let ns_if = format!("{name}n");
        let host_cidr = format!("{host_addr}/{prefix}");
        let ns_cidr = format!("{ns_addr}/{prefix}");
        run(Command::new("ip").args([
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            name,
        ]))?;
        run(Command::new("ip").args(["addr", "add", &host_cidr, "dev", &ns.host_if]))?;
        run(Command::new("ip").args(["link", "set", &ns.host_if, "up"]))?;
        run(Command::new("ip").args(["-n", name, "addr", "add", &ns_cidr, "dev", &ns_if]))?;
        run(Command::new("ip").args(["-n", name, "link", "set", &ns_if, "up"]))?;
        run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        ns.wait_up(&ns_if)?;
        Ok(ns)
    }

    /// Makes a namespace whose name (`<tag><pid>`, then `x<n>` for the n-th of this
    /// process) and /30 addresses (in 198.18.0.0/15) derive from this process's id, moving
    /// to the next block while an address is taken. `tag`: 1 to 3 lowercase letters.
    pub fn create_unique(tag: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        if tag.is_empty() || tag.len() > 3 || !tag.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(Error::Invalid(format!(
                "tag {tag:?} must be 1 to 3 lowercase letters"
            )));
        }
        Self::check()?;
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = if n == 0 {
            format!("{tag}{pid}")
        } else {
            format!("{tag}{pid}x{n}")
        };
        let first = pid.wrapping_mul(4).wrapping_add(n) % UNIQUE_BLOCKS;
        for i in 0..64 {
            let block = UNIQUE_BASE + ((first + i) % UNIQUE_BLOCKS) * 4;
            let (host, ns) = (Ipv4Addr::from(block + 1), Ipv4Addr::from(block + 2));
            if address_in_use(host)? || address_in_use(ns)? {
                continue;
            }
            return Self::create(&name, host, ns, 30);
        }
        Err(Error::Invalid(format!(
            "no free /30 block near block {first} of 198.18.0.0/15"
        )))
    }

    /// The namespace's name (`ip netns exec <name> …`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root namespace's address on the pair: what a process inside reaches the rest
    /// of the machine at (bind services for it here).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The namespace's address on the pair: what the rest of the machine reaches a
    /// process inside at.
    pub fn ns_addr(&self) -> Ipv4Addr {
        self.ns_addr
    }

    /// Whether the pair is cut now.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// A command that runs `exe` inside the namespace (`ip netns exec <name> <exe>`; the
    /// process is `exe` itself, so signals reach it directly).
    pub fn command(&self, exe: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(exe);
        cmd
    }

    /// Cuts the pair: from now on every packet arriving over it, on either side, is
    /// dropped without a word. Cutting a cut pair changes nothing.
    pub fn cut(&mut self) -> Result<()> {
        if self.cut {
            return Ok(());
        }
        // Both sides, so that neither direction carries anything; if the second fails,
        // the first is taken back.
        nft_apply(None, &rules(&self.name, &self.host_if))?;
        if let Err(e) = nft_apply(Some(&self.name), &rules(&self.name, &self.ns_if())) {
            let _ = self.remove_rules();
            return Err(e);
        }
        self.cut = true;
        Ok(())
    }

    /// Heals the pair: packets pass again (TCP retransmits what was lost meanwhile).
    pub fn heal(&mut self) -> Result<()> {
        if !self.cut {
            return Ok(());
        }
        self.remove_rules()?;
        self.cut = false;
        Ok(())
    }

    fn ns_if(&self) -> String {
        format!("{}n", self.name)
    }

    fn remove_rules(&self) -> Result<()> {
        let t = table(&self.name);
        let root = run(Command::new("nft").args(["delete", "table", "inet", &t]));
        let inside = run(Command::new("ip").args([
            "netns", "exec", &self.name, "nft", "delete", "table", "inet", &t,
        ]));
        root.and(inside).map(drop)
    }

    /// Waits until both ends of the pair are up (a new veth takes a moment).
    fn wait_up(&self, ns_if: &str) -> Result<()> {
        let until = Instant::now() + LINK_UP;
        loop {
            let host = run(Command::new("ip").args(["-o", "link", "show", &self.host_if]))?;
            let inside =
                run(Command::new("ip").args(["-n", &self.name, "-o", "link", "show", ns_if]))?;
            if [host, inside].iter().all(|l| l.contains("LOWER_UP")) {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(Error::Invalid(format!(
                    "veth pair {} / {ns_if} not up after {LINK_UP:?}",
                    self.host_if
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Each step on its own: a failed one must not leave the others undone. Deleting the
        // host end removes the pair at once, even while a process still holds the namespace.
        if self.cut {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &table(&self.name)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn validate(name: &str, host: Ipv4Addr, ns: Ipv4Addr, prefix: u8) -> Result<()> {
    let ok_name = !name.is_empty()
        && name.len() <= 13
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok_name {
        return Err(Error::Invalid(format!(
            "name {name:?} must be 1 to 13 lowercase letters and digits, starting with a letter"
        )));
    }
    if !(8..=30).contains(&prefix) {
        return Err(Error::Invalid(format!(
            "prefix /{prefix} is outside /8../30"
        )));
    }
    let mask = u32::MAX << (32 - prefix);
    let (h, n) = (u32::from(host), u32::from(ns));
    let host_bits = |a: u32| a & !mask;
    if h & mask != n & mask {
        return Err(Error::Invalid(format!(
            "{host} and {ns} are not in one /{prefix} subnet"
        )));
    }
    if h == n {
        return Err(Error::Invalid(format!("both sides have address {host}")));
    }
    for a in [h, n] {
        if host_bits(a) == 0 || host_bits(a) == !mask {
            return Err(Error::Invalid(format!(
                "{} is the network or broadcast address of its /{prefix}",
                Ipv4Addr::from(a)
            )));
        }
    }
    Ok(())
}

/// The nftables table of namespace `name` (the same name on both sides).
fn table(name: &str) -> String {
    format!("caretwin_{name}")
}

/// Drop everything that arrives over interface `iface`, before connection tracking.
fn rules(name: &str, iface: &str) -> String {
    format!(
        "table inet {} {{\n  chain input {{\n    type filter hook input priority -300; policy accept;\n    iifname \"{iface}\" drop\n  }}\n}}\n",
        table(name)
    )
}

/// Loads an nftables ruleset, in the root namespace or in namespace `ns`.
fn nft_apply(ns: Option<&str>, ruleset: &str) -> Result<()> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    cmd.args(["-f", "-"]);
    run_with(&mut cmd, Some(ruleset)).map(drop)
}

/// Whether `addr` is assigned to an interface of the root namespace.
fn address_in_use(addr: Ipv4Addr) -> Result<bool> {
    let out = run(Command::new("ip").args(["-4", "-o", "addr", "show"]))?;
    let needle = format!(" {addr}/");
    Ok(out.contains(&needle))
}

/// Runs `cmd` and returns its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    run_with(cmd, None)
}

/// Runs `cmd` with `input` on its stdin (none: empty) and returns its stdout, or an error
/// with its stderr.
fn run_with(cmd: &mut Command, input: Option<&str>) -> Result<String> {
    use std::io::Write;
    let line = command_line(cmd);
    let failed = |e: std::io::Error| Error::Command {
        command: line.clone(),
        status: "not run".into(),
        stderr: e.to_string(),
    };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(failed)?;
    let written = match (input, child.stdin.take()) {
        (Some(text), Some(mut stdin)) => stdin.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    let out = child.wait_with_output().map_err(failed)?;
    written.map_err(failed)?;
    if !out.status.success() {
        return Err(Error::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn bad_requests_are_refused_before_anything_runs() {
        let ok = |n, h, s, p| validate(n, ip(h), ip(s), p).is_ok();
        assert!(ok("ctp123", "198.18.0.1", "198.18.0.2", 30));
        assert!(ok("a", "10.9.0.1", "10.9.0.200", 24));
        assert!(!ok("", "198.18.0.1", "198.18.0.2", 30), "empty name");
        assert!(!ok("Bad", "198.18.0.1", "198.18.0.2", 30), "upper case");
        assert!(
            !ok("1ab", "198.18.0.1", "198.18.0.2", 30),
            "starts with a digit"
        );
        assert!(!ok("a-b", "198.18.0.1", "198.18.0.2", 30), "dash");
        assert!(
            !ok("abcdefghijklmn", "198.18.0.1", "198.18.0.2", 30),
            "too long"
        );
        assert!(!ok("a", "198.18.0.1", "198.18.0.5", 30), "two subnets");
        assert!(!ok("a", "198.18.0.1", "198.18.0.1", 30), "same address");
        assert!(!ok("a", "198.18.0.0", "198.18.0.1", 30), "network address");
        assert!(
            !ok("a", "198.18.0.1", "198.18.0.3", 30),
            "broadcast address"
        );
        assert!(!ok("a", "198.18.0.1", "198.18.0.2", 31), "prefix");
        assert!(
            Netns::create_unique("toolong").is_err(),
            "a long tag is refused before anything runs"
        );
    }

    #[test]
    fn the_ruleset_drops_only_what_arrives_over_the_pair() {
        let r = rules("ctp7", "ctp7h");
        assert!(r.contains("table inet caretwin_ctp7"), "{r}");
        assert!(r.contains("hook input"), "{r}");
        assert!(r.contains("iifname \"ctp7h\" drop"), "{r}");
    }
}
