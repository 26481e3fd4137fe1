//! The partition tool on the real kernel: a process in the namespace reaches the root
//! namespace over the pair; a cut drops traffic both ways without an error to either
//! side; a heal lets an open TCP connection carry on; dropping the namespace removes it.
//!
//! Needs root, `ip` and `nft`: without them the test says why and passes, unless `CI` is
//! set (CI machines have them; there it fails).

use caretwin_chaos::netns::{Error, Netns};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn namespace() -> Option<Netns> {
    match Netns::create_unique("ctn") {
        Ok(ns) => Some(ns),
        Err(Error::Unavailable(why)) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: {why}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Connects to `addr` (where nothing listens): `Ok` if refused at once (reachable),
/// `Err` with the kind otherwise.
fn probe(addr: SocketAddr) -> ErrorKind {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(1_500)) {
        Ok(_) => panic!("something listens at {addr}"),
        Err(e) => e.kind(),
    }
}

fn exists(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_cut_drops_traffic_silently_both_ways_and_a_heal_resumes_it() {
    let Some(mut ns) = namespace() else { return };
    let name = ns.name().to_owned();
    let host_if = format!("{name}h");

    // An echo client inside the namespace, connected to a listener in the root namespace.
    let listener = TcpListener::bind((ns.host_addr(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut echo = ns
        .command("bash")
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/{port}; while read -r l <&3; do echo \"$l\" >&3; done",
                ns.host_addr()
            ),
        ])
        .spawn()
        .unwrap();
    let (conn, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip(),
        ns.ns_addr(),
        "the client is inside the namespace"
    );
    conn.set_read_timeout(Some(Duration::from_millis(1_000)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut line = String::new();
    writeln!(w, "before").unwrap();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "before\n");
    // Reachable: a port nobody listens on inside refuses at once.
    let closed = SocketAddr::from((ns.ns_addr(), 9));
    assert_eq!(probe(closed), ErrorKind::ConnectionRefused);

    ns.cut().unwrap();
    assert!(ns.is_cut());
    // Nothing comes back and nobody is told: the write succeeds, the answer never comes,
    // a new connection neither succeeds nor is refused, it times out.
    writeln!(w, "during").unwrap();
    line.clear();
    let err = reader.read_line(&mut line).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(probe(closed), ErrorKind::TimedOut);
    // The other way too: from inside, the root namespace does not answer.
    let inside = ns
        .command("bash")
        .args([
            "-c",
            &format!(
                "timeout 1.5 bash -c 'echo > /dev/tcp/{}/{port}'; echo $?",
                ns.host_addr()
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inside.stdout).trim(),
        "124",
        "a connection from inside timed out: {inside:?}"
    );

    ns.heal().unwrap();
    // The open connection carries on: the line written during the cut is retransmitted.
    conn_read_within(&mut reader, "during\n", Duration::from_secs(10));
    assert_eq!(probe(closed), ErrorKind::ConnectionRefused);

    let _ = echo.kill();
    let _ = echo.wait();
    assert!(exists(&["link", "show", &host_if]));
    drop(ns);
    assert!(!exists(&["link", "show", &host_if]), "the pair is gone");
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "the namespace is gone"
    );
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains(&name),
        "no rules are left"
    );
}

fn conn_read_within(reader: &mut BufReader<TcpStream>, want: &str, within: Duration) {
    let until = Instant::now() + within;
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(_) => {
                assert_eq!(line, want);
                return;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(Instant::now() < until, "nothing arrived in {within:?}");
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_namespace_dropped_while_cut_leaves_nothing_behind() {
    let Some(mut ns) = namespace() else { return };
    let name = ns.name().to_owned();
    ns.cut().unwrap();
    ns.cut().unwrap(); // idempotent
    drop(ns);
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains(&name));
    assert!(!exists(&["link", "show", &format!("{name}h")]));
}

#[test]
fn taken_names_and_addresses_are_refused() {
    let Some(ns) = namespace() else { return };
    let again = Netns::create(
        ns.name(),
        "198.19.255.1".parse().unwrap(),
        "198.19.255.2".parse().unwrap(),
        30,
    );
    assert!(matches!(again, Err(Error::Invalid(_))), "{again:?}");
    let clash = Netns::create(
        "ctnclash",
        ns.host_addr(),
        "198.19.255.2".parse().unwrap(),
        14,
    );
    assert!(matches!(clash, Err(Error::Invalid(_))), "{clash:?}");
    assert!(!exists(&["link", "show", "ctnclashh"]), "nothing was made");
}

#[test]
fn the_chaos_tool_cuts_and_heals_a_command_and_passes_on_its_status() {
    if namespace().is_none() {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_caretwin-chaos");
    let run = |script: &str| {
        Command::new(exe)
            .args([
                "partition",
                "--cut-after",
                "100ms",
                "--heal-after",
                "200ms",
                "--",
            ])
            .args(["bash", "-c", script])
            .output()
            .unwrap()
    };
    // Inside, the command sees only the pair (and lo): no route anywhere else.
    let ok = run("sleep 0.6; ip -4 -o addr show | grep -v ' lo ' | grep -c 198.1");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{ok:?}");
    assert!(out.contains("partition: namespace ctc"), "{out}");
    assert!(out.contains("partition: cut\npartition: healed"), "{out}");
    assert!(out.contains("\n1\n"), "one address inside: {out}");
    let failed = run("exit 3");
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("the command failed"),
        "{failed:?}"
    );
}
