//! `HAProxy` (Debian's package; `.ci/test` installs it) in TCP mode in front of gateways,
//! as an L4 load balancer sending PROXY protocol v2: one process per test on a free
//! port, killed on drop.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port, scratch_dir};

/// A running `HAProxy`; killed on drop.
pub struct HaProxy {
    child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
}

impl HaProxy {
    /// Balances TCP connections round-robin over `backends`, each connection opened with
    /// `send-proxy-v2`.
    pub async fn start(name: &str, backends: &[SocketAddr]) -> HaProxy {
        let dir = scratch_dir(name);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut servers = String::new();
        for (index, backend) in backends.iter().enumerate() {
            writeln!(servers, "    server gw{index} {backend} send-proxy-v2").unwrap();
        }
        let config = format!(
            "global\n    maxconn 1000\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
             frontend clients\n    bind {addr}\n    default_backend gateways\n\
             backend gateways\n    balance roundrobin\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("haproxy is installed (.ci/test installs it)");
        assert!(
            check.status.success(),
            "haproxy -c: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let haproxy = HaProxy { child, addr };
        eventually(
            Duration::from_secs(10),
            format!("haproxy listens on {addr}"),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
        haproxy
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
