//! redis-server processes for the rate-limiting and readiness tests: each on a free port
//! in its own scratch directory, killed on drop. (`.ci/test` installs redis-server.)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port, scratch_dir};

/// A redis-server on a free loopback port; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    /// Extra arguments (`--requirepass`, `--cluster-enabled`, `--tls-port`, `--aclfile`).
    args: Vec<String>,
}

impl RedisServer {
    /// Starts a server with `args` on a free port, in a scratch directory named `name`.
    pub async fn start(name: &str, args: &[&str]) -> RedisServer {
        let port = free_port();
        Self::start_on(port, scratch_dir(name), args).await
    }

    /// Starts a server on `port` in `dir`. With `--tls-port` among `args` that is the TLS
    /// port and the plain one is off.
    pub async fn start_on(port: u16, dir: PathBuf, args: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.spawn().await;
        server
    }

    /// Starts (again) on the same port and waits until it answers.
    pub async fn spawn(&mut self) {
        let tls = self.args.iter().any(|a| a == "--tls-port");
        let plain_port = if tls { 0 } else { self.port };
        let child = Command::new("redis-server")
            .args(["--port", &plain_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/test installs it)");
        self.child = Some(child);
        let port = self.port;
        let this = &*self;
        eventually(
            Duration::from_secs(10),
            format!("redis-server answers on port {port}"),
            || async move {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
                {
                    return false;
                }
                // A TLS port accepts connections once it serves; a plain one must answer
                // (PONG, or NOAUTH/NOPERM with a password or ACL file: it serves).
                tls || !this.cli(&["PING"]).is_empty()
            },
        )
        .await;
    }

    /// `redis-cli -p PORT ARGS`, stdout trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
