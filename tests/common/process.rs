//! The real `gatehouse` binary, for what only it shows (exit codes, signals, `check`
//! output, logs), and log lines as events: a process's output and the in-process
//! gateway's logs are [`Lines`] that tests await instead of sleeping.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::subscriber::DefaultGuard;

use super::{eventually, init};

/// How long the binary may take to print its listening line (a cold debug binary on a
/// loaded 2-core machine).
const LISTEN_WITHIN: Duration = Duration::from_secs(20);

/// Lines printed so far, with a notification on every new line and at the end.
pub struct Lines {
    all: Mutex<Vec<String>>,
    /// Bumped on every change: each new line, each closed pipe.
    changed: watch::Sender<u64>,
    /// Pipes that reached their end.
    ended: Mutex<usize>,
}

impl Default for Lines {
    fn default() -> Lines {
        Lines {
            all: Mutex::default(),
            changed: watch::channel(0).0,
            ended: Mutex::default(),
        }
    }
}

impl Lines {
    pub fn push(&self, line: String) {
        self.all.lock().unwrap().push(line);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Marks one of the writers (a pipe) as closed.
    pub fn end(&self) {
        *self.ended.lock().unwrap() += 1;
        self.changed.send_modify(|n| *n += 1);
    }

    fn ended(&self) -> usize {
        *self.ended.lock().unwrap()
    }

    /// Everything so far, joined with newlines.
    pub fn text(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.all
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// The first line containing `needle`.
    pub fn find(&self, needle: &str) -> Option<String> {
        self.all
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.contains(needle))
            .cloned()
    }

    /// Waits (on the line events, no polling) until `found` returns `Some` for the lines
    /// so far; panics after `timeout` naming `what`, with everything printed.
    pub async fn wait<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut found: impl FnMut(&[String]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Subscribed before looking, so a line printed meanwhile wakes us.
            let mut changed = self.changed.subscribe();
            if let Some(value) = found(&self.all.lock().unwrap()) {
                return value;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; printed so far:\n{}",
                    self.text()
                );
            }
        }
    }

    /// Waits until `count` lines contain `needle`; returns the last of them.
    pub async fn wait_for_lines(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let what = format!("{count} line(s) containing {needle:?}");
        self.wait(timeout, &what, |lines| {
            lines
                .iter()
                .filter(|line| line.contains(needle))
                .nth(count - 1)
                .cloned()
        })
        .await
    }

    /// Waits until a line contains `needle`; returns it.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_lines(needle, 1, timeout).await
    }
}

// ---------------------------------------------------------------------------------------
// The in-process gateway's logs
// ---------------------------------------------------------------------------------------

/// This thread's log events (info and above, plain text) while it lives. A
/// `#[tokio::test]` runs every task it spawns on its own thread (current-thread
/// runtime), so this sees the in-process gateway's events and no other test's.
pub struct LogCapture {
    pub lines: Arc<Lines>,
    _guard: DefaultGuard,
}

struct Sink(Arc<Lines>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One formatted event per write.
        for line in String::from_utf8_lossy(buf).lines() {
            self.0.push(line.to_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this thread's log events until the returned value is dropped.
pub fn capture_logs() -> LogCapture {
    init();
    let lines = Arc::new(Lines::default());
    let sink = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(move || Sink(sink.clone()))
        .finish();
    LogCapture {
        lines,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

// ---------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------

/// Path of the built `gatehouse` binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_gatehouse")
}

/// Runs `gatehouse ARGS` to completion.
pub fn run_binary(args: &[&str]) -> std::process::Output {
    Command::new(binary()).args(args).output().unwrap()
}

/// Waits up to `timeout` for `child` to exit, from a plain thread (synchronous tests).
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `gatehouse` process, killed on drop.
pub struct Process {
    pub child: Child,
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Every line the process printed so far (stdout and stderr).
    pub output: Arc<Lines>,
}

impl Process {
    /// Sends a signal (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = &mut self.child;
        let status = eventually(timeout, "gatehouse exited", || {
            let exited = child.try_wait().unwrap();
            async move { exited }
        })
        .await;
        status.code()
    }

    /// All output so far, joined.
    pub fn output(&self) -> String {
        self.output.text()
    }

    /// How many printed lines contain `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.output.count(needle)
    }

    /// Waits until a printed line contains `needle` and returns it; panics with the
    /// output after `timeout`.
    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.output.wait_for_line(needle, timeout).await
    }

    /// Waits until `count` printed lines contain `needle`.
    pub async fn wait_for_lines(&self, needle: &str, count: usize, timeout: Duration) -> String {
        self.output.wait_for_lines(needle, count, timeout).await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `gatehouse --config CONFIG` and waits until it logs its listening addresses.
/// Panics with the process output if it exits or does not listen within 20 s.
pub async fn spawn_binary(config: &Path) -> Process {
    let mut command = Command::new(binary());
    command.args(["--config", config.to_str().unwrap()]);
    spawn_command(command).await
}

/// [`spawn_binary`] for synchronous `#[test]`s (on a runtime of its own).
pub fn spawn_binary_blocking(config: &Path) -> Process {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(spawn_binary(config))
}

/// Starts `command` (the gateway, possibly behind a wrapper such as `setpriv`) with
/// `RUST_LOG=info` unless the command sets `RUST_LOG` itself, collects its output and
/// waits for its listening line.
pub async fn spawn_command(mut command: Command) -> Process {
    if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
        command.env("RUST_LOG", "info");
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = Arc::new(Lines::default());
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                output.push(line);
            }
            output.end();
        });
    }
    // Owned by a `Process` at once, so it is killed even when startup fails.
    let mut process = Process {
        child,
        https: SocketAddr::from(([127, 0, 0, 1], 0)),
        http: None,
        admin: None,
        output: output.clone(),
    };
    let listening = output
        .wait(LISTEN_WITHIN, "the \"gatehouse listening\" line", |lines| {
            let line = lines.iter().find(|l| l.contains("gatehouse listening"));
            match line {
                Some(line) => Some(Some(line.clone())),
                // Both pipes closed: the process is gone.
                None if output.ended() == 2 => Some(None),
                None => None,
            }
        })
        .await;
    let Some(line) = listening else {
        let status = process.wait_exit(Duration::from_secs(5)).await;
        panic!(
            "gatehouse exited with {status:?} before listening:\n{}",
            process.output()
        );
    };
    // Text lines say `https=ADDR`, JSON lines `"https":"ADDR"`.
    let field = |name: &str| -> Option<SocketAddr> {
        let rest = if let Some(at) = line.find(&format!("\"{name}\":\"")) {
            &line[at + name.len() + 4..]
        } else {
            let at = line.find(&format!("{name}="))?;
            &line[at + name.len() + 1..]
        };
        // `off` (listener disabled) does not parse: `None`.
        let end = rest.find([' ', '"']).unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    process.https = field("https").expect("https address in the listening line");
    process.http = field("http");
    process.admin = field("admin");
    process
}
