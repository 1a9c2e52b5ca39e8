//! `healthcheck` subcommands: a minimal HTTP GET against a process's own
//! health endpoint, so container images need no curl. Exit status is what
//! Docker's HEALTHCHECK and exec probes read.

use std::{net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The address to probe for a listen address: a wildcard listener is
/// reached on loopback.
pub fn local(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// True if `GET path` on `addr` answers 2xx within `timeout`.
pub async fn healthy(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        // "HTTP/1.1 200"
        Ok::<bool, std::io::Error>(head.starts_with(b"HTTP/1.") && head[9] == b'2')
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        assert_eq!(
            local("0.0.0.0:8080".parse().unwrap()).to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            local("10.1.2.3:9091".parse().unwrap()).to_string(),
            "10.1.2.3:9091"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_unhealthy() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is dropped at once: the port refuses connections.
        assert!(!healthy(port, "/healthz", Duration::from_secs(1)).await);
    }
}
