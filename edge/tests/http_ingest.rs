//! HTTP/JSON ingest over a real socket: accepted only once on disk, bad input refused
//! whole, a full outbox says so, alarms always taken.

use caretwin_edge::outbox::{Outbox, OutboxConfig};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serve(limit_bytes: u64) -> (tempfile::TempDir, Arc<Outbox>, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(
        Outbox::open(&OutboxConfig {
            limit_bytes,
            ..OutboxConfig::at(dir.path().join("outbox"))
        })
        .unwrap(),
    );
    let app = caretwin_edge::http::router(outbox.clone(), Arc::new(tokio::sync::Notify::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (dir, outbox, addr)
}

/// POSTs `body` to `path`; returns the status code and the body.
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn reading(device: &str, value: &str) -> String {
    format!(
        r#"{{"device":"{device}","signal":"brew_pressure","value":{value},"ts_ms":1795392000000}}"#
    )
}

#[tokio::test]
async fn readings_are_acknowledged_with_their_sequence_numbers() {
    let (_d, outbox, addr) = serve(1 << 30).await;
    let body = format!("[{},{}]", reading("t1:c1", "9.1"), reading("t1:c1", "9.2"));
    let (status, text) = post(addr, "/v1/readings", &body).await;
    assert_eq!(status, 202, "{text}");
    assert!(
        text.contains(r#""seq":1"#) && text.contains(r#""seq":2"#),
        "{text}"
    );
    assert_eq!(outbox.last_seq("t1:c1").await, 2);
}

#[tokio::test]
async fn bad_input_is_refused_whole() {
    let (_d, outbox, addr) = serve(1 << 30).await;
    for body in [
        "not json".to_owned(),
        "[]".to_owned(),
        format!("[{}]", reading("t1:c1", "1e999")),
        format!("[{},{}]", reading("t1:c1", "9.1"), reading("", "9.1")),
        r#"[{"device":"t1:c1","signal":"x","value":1,"ts_ms":1,"extra":1}]"#.to_owned(),
    ] {
        let (status, text) = post(addr, "/v1/readings", &body).await;
        assert_eq!(status, 400, "{body} -> {text}");
        assert!(text.contains("error"), "{text}");
    }
    assert_eq!(outbox.last_seq("t1:c1").await, 0, "nothing accepted");
}

#[tokio::test]
async fn a_full_outbox_refuses_readings_but_takes_alarms() {
    let (_d, outbox, addr) = serve(1).await;
    let (status, text) = post(
        addr,
        "/v1/readings",
        &format!("[{}]", reading("t1:c1", "9.1")),
    )
    .await;
    assert_eq!(status, 507, "{text}");
    assert!(text.contains("full"), "{text}");
    let alarm = r#"{"device":"t1:hub","kind":"smoke","ts_ms":1795392000000}"#;
    let (status, text) = post(addr, "/v1/alarms", alarm).await;
    assert_eq!(status, 202, "{text}");
    assert_eq!(outbox.last_seq("t1:hub").await, 1);
}
