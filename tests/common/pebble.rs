//! A real ACME CA for the ACME tests: Debian's `pebble` with `pebble-challtestsrv` as
//! its DNS server (every name resolves to 127.0.0.1), on free ports, with real HTTP-01
//! and TLS-ALPN-01 validation against the ports the test gives (the gateway's
//! listeners: pick them first with `free_port`, then start the gateway on them).
//! `PEBBLE_VA_NOSLEEP=1` removes pebble's random validation delay,
//! `PEBBLE_WFE_NONCEREJECT=0` its random nonce rejections and `PEBBLE_AUTHZREUSE=0` its
//! reuse of earlier authorizations (so every order is validated). Both processes are
//! killed on drop. (`.ci/test` installs pebble.)

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::{eventually, free_port, Lines, Pki};

/// Whether `pebble` and `pebble-challtestsrv` are installed. When not, ACME tests print
/// why they are skipped and pass.
pub fn pebble_installed() -> bool {
    let found = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
    };
    let installed = found("pebble") && found("pebble-challtestsrv");
    if !installed {
        eprintln!("SKIPPED: pebble is not installed (apt-get install pebble; .ci/test does)");
    }
    installed
}

/// What the CA validates against and how long its certificates live.
#[derive(Debug, Clone, Copy)]
pub struct PebbleOptions {
    /// Where pebble sends HTTP-01 validations (the gateway's `listen.http` port).
    pub http_port: u16,
    /// Where pebble sends TLS-ALPN-01 validations (the gateway's `listen.https` port).
    pub tls_port: u16,
    /// `certificateValidityPeriod` in seconds (pebble's default: about 5 years).
    pub validity_seconds: Option<u64>,
}

/// A running pebble and its DNS server.
pub struct Pebble {
    ca: Child,
    dns: Child,
    /// The directory URL (`acme.directory`).
    pub directory: String,
    /// The CA of pebble's own HTTPS listener (`acme.directory_ca_file`).
    pub ca_file: PathBuf,
    /// The management interface (`/roots/0`).
    pub management: String,
    /// pebble's log (of the current process: a restart starts a new one).
    pub output: Arc<Lines>,
    listener_root_pem: String,
    /// How pebble was started, to start it again.
    config_path: PathBuf,
    dns_port: u16,
}

impl Pebble {
    /// Starts the DNS server and pebble (its HTTPS certificate from a fresh test PKI
    /// named `name`) and waits until the directory is served.
    pub async fn start(name: &str, options: PebbleOptions) -> Pebble {
        let pki = Pki::new(&format!("{name}-pebble"));
        let (_, files) = pki.localhost("pebble");
        let (listen, management, dns_port, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": files.cert,
                "privateKey": files.key,
                "httpPort": options.http_port,
                "tlsPort": options.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        if let Some(seconds) = options.validity_seconds {
            config["pebble"]["certificateValidityPeriod"] = seconds.into();
        }
        let config_path = files.cert.with_file_name("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();

        let (dns, dns_output) = spawn_logged(
            Command::new("pebble-challtestsrv")
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-management", &format!("127.0.0.1:{dns_management}")]),
        );
        dns_output
            .wait_for_line("Starting management server", Duration::from_secs(20))
            .await;
        let (pebble, output) = spawn_pebble(&config_path, dns_port);
        let pebble = Pebble {
            ca: pebble,
            dns,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            ca_file: files.root.clone(),
            management: format!("https://127.0.0.1:{management}"),
            output,
            listener_root_pem: pki.root_pem(),
            config_path,
            dns_port,
        };
        pebble
            .output
            .wait_for_line("ACME directory available", Duration::from_secs(20))
            .await;
        pebble
    }

    /// Stops pebble and starts it again on the same addresses: it forgets every account
    /// and order (pebble keeps them in memory) and issues from a new root.
    pub async fn restart(&mut self) {
        let _ = self.ca.kill();
        let _ = self.ca.wait();
        let (ca, output) = spawn_pebble(&self.config_path, self.dns_port);
        self.ca = ca;
        self.output = output;
        self.output
            .wait_for_line("ACME directory available", Duration::from_secs(20))
            .await;
    }

    /// The root of the certificates pebble issues (new at every start), as PEM. The
    /// management listener may start a moment after the directory: asked until it answers.
    pub async fn issuer_root_pem(&self) -> String {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(
                (*super::tls_client_config(&self.listener_root_pem, &[])).clone(),
            )
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = format!("{}/roots/0", self.management);
        eventually(
            Duration::from_secs(20),
            format!("pebble serves its root at {url}"),
            || async {
                let response = client.get(&url).send().await?.error_for_status()?;
                response.text().await
            },
        )
        .await
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in [&mut self.ca, &mut self.dns] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts pebble with its test settings (see the module comment).
fn spawn_pebble(config_path: &std::path::Path, dns_port: u16) -> (Child, Arc<Lines>) {
    spawn_logged(
        Command::new("pebble")
            .arg("-config")
            .arg(config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0"),
    )
}

/// Starts `command` with its stdout and stderr collected as [`Lines`].
fn spawn_logged(command: &mut Command) -> (Child, Arc<Lines>) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pebble is installed (pebble_installed() said so)");
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
    (child, output)
}
