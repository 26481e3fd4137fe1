//! A TCP relay: accepts connections on one address and joins each to a new connection
//! to a target.
//!
//! What it is for: the test PostgreSQL server listens on 127.0.0.1 only, which a process
//! in another network namespace cannot reach; a relay on the root namespace's side of the
//! namespace's veth pair can, and a cut of the pair cuts the relayed connections as it
//! would a remote server's. It runs on a runtime of its own, so it keeps relaying
//! whatever the test's own threads are doing.

use std::net::SocketAddr;

/// A running relay; dropped, it stops and every relayed connection is closed.
pub struct Relay {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Relay {
    /// Listens on `listen` (port 0: any free port) and relays each connection to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("relay")
            .enable_all()
            .build()?;
        // Bound without blocking on the runtime: the caller may be inside one.
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = {
            let _in = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    // Out of descriptors, say: try again shortly rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    // A target that refuses closes the inbound connection: the client sees
                    // the server gone, as it would without the relay.
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            runtime: Some(runtime),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Not a blocking shutdown: the relay may be dropped inside the test's runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_go_both_ways_and_a_drop_closes_the_connections() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay =
            Relay::start("127.0.0.1:0".parse().unwrap(), server.local_addr().unwrap()).unwrap();
        let mut client = std::net::TcpStream::connect(relay.addr()).unwrap();
        let (mut upstream, _) = server.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        upstream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        upstream.write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        drop(relay);
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "closed by the relay's end"
        );
    }
}
