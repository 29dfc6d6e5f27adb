//! Certificate hot reload (issue 6), mostly through the real binary: rotation by in-place
//! overwrite, write-then-rename, Kubernetes `..data` symlink swap, cert-then-key with a
//! delay, SIGHUP and the poll fallback each make a new connection see the new serial
//! within 1 s; broken files keep the last good chain served and are logged; SNI slots
//! reload independently; continuous load with a new TLS connection per request sees no
//! failure during 20 rotations. Latencies are printed (`--nocapture`) for the record.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    base_config, served_serial, spawn_binary, tls_client_config, CertFiles, Leaf, Pki, Process,
    Upstream,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// New handshakes must see a rotation within 1 s of the last write; asserted with slack
/// for a loaded CI machine (the measured latency is printed).
const LIMIT: Duration = Duration::from_millis(1500);

/// Generous wait for a log line that should appear within `LIMIT`.
const LOG_WAIT: Duration = Duration::from_secs(5);

const NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// Adds `lines` to the `[tls]` section of a config made by `base_config`.
fn with_tls(config: &str, lines: &str) -> String {
    assert!(config.contains("[tls]\n"));
    config.replacen("[tls]\n", &format!("[tls]\n{lines}\n"), 1)
}

/// Writes `config` next to the certificates and starts the real binary on it.
fn start(pki: &Pki, config: &str) -> Process {
    let path = pki.dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    spawn_binary(&path)
}

/// The served chain file for `leaf`: leaf, then intermediate.
fn chain_pem(pki: &Pki, leaf: &Leaf) -> String {
    format!("{}{}", leaf.cert_pem, pki.intermediate_pem())
}

/// Overwrites both files in place (truncate + write), cert first.
fn write_in_place(pki: &Pki, files: &CertFiles, leaf: &Leaf) {
    std::fs::write(&files.cert, chain_pem(pki, leaf)).unwrap();
    std::fs::write(&files.key, &leaf.key_pem).unwrap();
}

/// Writes each file to a temporary name in the same directory and renames it over the
/// old one, as secret managers and `mv` do.
fn write_renamed(pki: &Pki, files: &CertFiles, leaf: &Leaf) {
    for (path, contents) in [
        (&files.cert, chain_pem(pki, leaf)),
        (&files.key, leaf.key_pem.clone()),
    ] {
        let tmp = path.with_extension("tmp-new");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// Opens new TLS connections until `expected` is served; returns the time since `since`.
/// Panics after `LIMIT`.
async fn wait_serial(addr: SocketAddr, root: &str, expected: &str, since: Instant) -> Duration {
    let mut last = Err(String::new());
    while since.elapsed() < LIMIT {
        last = served_serial(addr, "localhost", root).await;
        if last.as_deref() == Ok(expected) {
            return since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("serial {expected} not served within {LIMIT:?} of the last write; last handshake gave {last:?}");
}

async fn serial(addr: SocketAddr, root: &str) -> String {
    served_serial(addr, "localhost", root).await.unwrap()
}

/// Lines printed so far containing `needle`.
fn count_lines(process: &Process, needle: &str) -> usize {
    process
        .output
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(needle))
        .count()
}

/// Waits until `count` printed lines contain `needle`.
async fn wait_lines(process: &Process, needle: &str, count: usize) {
    let deadline = Instant::now() + LOG_WAIT;
    while count_lines(process, needle) < count {
        assert!(
            Instant::now() < deadline,
            "no line containing {needle:?} within {LOG_WAIT:?}:\n{}",
            process.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn in_place_overwrite_is_served_within_a_second_and_open_connections_continue() {
    let pki = Pki::new("reload-in-place");
    let (old, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let process = start(&pki, &base_config(&files, upstream.addr));
    let root = pki.root_pem();
    assert_eq!(serial(process.https, &root).await, old.serial_hex);

    // A connection established before the rotation.
    let connector = TlsConnector::from(tls_client_config(&root, &[b"http/1.1"]));
    let tcp = TcpStream::connect(process.https).await.unwrap();
    let mut open = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();

    let new = pki.leaf(NAMES);
    write_in_place(&pki, &files, &new);
    let latency = wait_serial(process.https, &root, &new.serial_hex, Instant::now()).await;
    eprintln!("reload latency, in-place overwrite: {latency:?}");
    wait_lines(&process, "certificate reloaded", 1).await;
    let line = process
        .output
        .lock()
        .unwrap()
        .iter()
        .find(|line| line.contains("certificate reloaded"))
        .cloned()
        .unwrap();
    for field in [
        "subject=",
        "serial=",
        "not_after=",
        "names=localhost,127.0.0.1",
    ] {
        assert!(line.contains(field), "{field} missing from: {line}");
    }

    // The established connection keeps its chain and still serves requests.
    let leaf = open.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(common::serial_hex(&leaf), old.serial_hex);
    let response = get(&mut open).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[tokio::test]
async fn write_then_rename_is_served_within_a_second() {
    let pki = Pki::new("reload-rename");
    let (old, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    // Relative paths all the way, as with the default `--config gateway.toml` and
    // `cert = "certs/site.crt"`: the binary runs in the package directory (the scratch
    // directory may lie outside it, with CARGO_TARGET_DIR elsewhere).
    let relative = relative_path(Path::new(env!("CARGO_MANIFEST_DIR")), &pki.dir);
    let name = |path: &Path| path.file_name().unwrap().to_str().unwrap().to_owned();
    let config = format!(
        "[listen]\nhttps = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca_bundle = \"{}\"\n[upstream]\nurl = \"http://{}\"\n",
        name(&files.cert),
        name(&files.key),
        name(&files.bundle),
        upstream.addr
    );
    std::fs::write(pki.dir.join("gateway.toml"), config).unwrap();
    let process = spawn_binary(&relative.join("gateway.toml"));
    let root = pki.root_pem();
    assert_eq!(serial(process.https, &root).await, old.serial_hex);

    for round in 1..=3 {
        let new = pki.leaf(NAMES);
        write_renamed(&pki, &files, &new);
        let latency = wait_serial(process.https, &root, &new.serial_hex, Instant::now()).await;
        eprintln!("reload latency, write-then-rename #{round}: {latency:?}");
    }
    assert_eq!(count_lines(&process, "certificate reload refused"), 0);
}

/// `to` relative to `from` (both absolute), with `..` where needed.
fn relative_path(from: &Path, to: &Path) -> std::path::PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut relative = std::path::PathBuf::new();
    for _ in common..from.len() {
        relative.push("..");
    }
    for component in &to[common..] {
        relative.push(component);
    }
    relative
}

/// Publishes `leaf` the way the kubelet updates a mounted Secret: a new timestamped
/// directory, a `..data_tmp` symlink to it renamed over `..data`, the old directory
/// removed. `tls.crt` and `tls.key` are symlinks into `..data/` created once.
fn kubernetes_publish(pki: &Pki, mount: &Path, generation: u32, leaf: &Leaf) {
    let name = format!("..2026_01_01_00_00_{generation:02}.123456789");
    let data = mount.join(&name);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("tls.crt"), chain_pem(pki, leaf)).unwrap();
    std::fs::write(data.join("tls.key"), &leaf.key_pem).unwrap();
    let tmp = mount.join("..data_tmp");
    std::os::unix::fs::symlink(&name, &tmp).unwrap();
    std::fs::rename(&tmp, mount.join("..data")).unwrap();
    if generation == 1 {
        for file in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{file}"), mount.join(file)).unwrap();
        }
    } else {
        let old = mount.join(format!(
            "..2026_01_01_00_00_{:02}.123456789",
            generation - 1
        ));
        std::fs::remove_dir_all(old).unwrap();
    }
}

#[tokio::test]
async fn kubernetes_symlink_swap_is_served_within_a_second() {
    let pki = Pki::new("reload-k8s");
    let (_, mut files) = pki.localhost("unused");
    let mount = pki.dir.join("secret");
    std::fs::create_dir_all(&mount).unwrap();
    let first = pki.leaf(NAMES);
    kubernetes_publish(&pki, &mount, 1, &first);
    files.cert = mount.join("tls.crt");
    files.key = mount.join("tls.key");
    let upstream = Upstream::start().await;
    let process = start(&pki, &base_config(&files, upstream.addr));
    let root = pki.root_pem();
    assert_eq!(serial(process.https, &root).await, first.serial_hex);

    for generation in 2..=4 {
        let new = pki.leaf(NAMES);
        kubernetes_publish(&pki, &mount, generation, &new);
        let latency = wait_serial(process.https, &root, &new.serial_hex, Instant::now()).await;
        eprintln!("reload latency, Kubernetes ..data swap #{generation}: {latency:?}");
    }
    assert_eq!(count_lines(&process, "certificate reload refused"), 0);
}

#[tokio::test]
async fn cert_then_key_two_seconds_later_is_refused_once_then_swapped() {
    let pki = Pki::new("reload-partial");
    let (old, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    // A fast poll as well: it must not re-log the same mismatch.
    let config = with_tls(
        &base_config(&files, upstream.addr),
        "reload_poll_interval = \"200ms\"",
    );
    let process = start(&pki, &config);
    let root = pki.root_pem();

    let new = pki.leaf(NAMES);
    std::fs::write(&files.cert, chain_pem(&pki, &new)).unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            serial(process.https, &root).await,
            old.serial_hex,
            "the mismatched pair must not be served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_lines(&process, "does not match the certificate", 1).await;
    std::fs::write(&files.key, &new.key_pem).unwrap();
    let latency = wait_serial(process.https, &root, &new.serial_hex, Instant::now()).await;
    eprintln!("reload latency, cert then key 2 s later (after the key): {latency:?}");
    // Let a few more polls run: still one report of the mismatch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mismatch = count_lines(&process, "does not match the certificate");
    assert_eq!(
        mismatch,
        1,
        "mismatch logged {mismatch} times:\n{}",
        process.output()
    );
    assert_eq!(count_lines(&process, "certificate reloaded"), 1);
}

#[tokio::test]
async fn sighup_reloads_when_nothing_else_would() {
    let pki = Pki::new("reload-sighup");
    let (old, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let config = with_tls(
        &base_config(&files, upstream.addr),
        "reload_watch = false\nreload_poll_interval = \"0s\"",
    );
    let process = start(&pki, &config);
    let root = pki.root_pem();

    let new = pki.leaf(NAMES);
    write_in_place(&pki, &files, &new);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        serial(process.https, &root).await,
        old.serial_hex,
        "watch and poll are off"
    );
    let sent = Instant::now();
    process.signal("HUP");
    let latency = wait_serial(process.https, &root, &new.serial_hex, sent).await;
    eprintln!("reload latency, SIGHUP: {latency:?}");
    wait_lines(
        &process,
        "certificate reload requested: every certificate is valid",
        1,
    )
    .await;

    // A SIGHUP with a broken file says so and keeps serving.
    std::fs::write(&files.key, "").unwrap();
    process.signal("HUP");
    wait_lines(&process, "certificate(s) refused", 1).await;
    wait_lines(&process, &format!("{} is empty", files.key.display()), 1).await;
    assert_eq!(serial(process.https, &root).await, new.serial_hex);
}

#[tokio::test]
async fn poll_picks_up_changes_without_file_system_events() {
    let pki = Pki::new("reload-poll");
    let (old, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let config = with_tls(
        &base_config(&files, upstream.addr),
        "reload_watch = false\nreload_poll_interval = \"300ms\"",
    );
    let process = start(&pki, &config);
    let root = pki.root_pem();

    // Rewriting the same contents (a touch) is not a reload.
    write_in_place(&pki, &files, &old);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(count_lines(&process, "certificate reloaded"), 0);

    let new = pki.leaf(NAMES);
    write_renamed(&pki, &files, &new);
    let latency = wait_serial(process.https, &root, &new.serial_hex, Instant::now()).await;
    eprintln!("reload latency, poll every 300 ms: {latency:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(count_lines(&process, "certificate reloaded"), 1);
}

/// Puts a broken file in place.
type BreakFiles<'a> = Box<dyn Fn() + 'a>;

#[tokio::test]
async fn broken_files_keep_the_last_good_chain_until_fixed() {
    let pki = Pki::new("reload-broken");
    let other = Pki::new("reload-broken-other-ca");
    let (first, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let process = start(&pki, &base_config(&files, upstream.addr));
    let root = pki.root_pem();
    let (cert, key) = (files.cert.display(), files.key.display());
    let now = time::OffsetDateTime::now_utc();
    let expired = pki.leaf_valid(
        NAMES,
        now - time::Duration::days(90),
        now - time::Duration::days(1),
    );
    let foreign = pki.leaf_signed_by(
        NAMES,
        now - time::Duration::days(1),
        now + time::Duration::days(90),
        &other.intermediate,
    );
    let stranger = pki.leaf(NAMES);

    let cases: Vec<(&str, BreakFiles<'_>, String)> = vec![
        (
            "empty certificate",
            Box::new(|| std::fs::write(&files.cert, "").unwrap()),
            format!("certificate file {cert} is empty"),
        ),
        (
            "garbage key",
            Box::new(|| std::fs::write(&files.key, "this is not a key\n").unwrap()),
            format!("private key file {key} holds no PEM block"),
        ),
        (
            "key of another certificate",
            Box::new(|| std::fs::write(&files.key, &stranger.key_pem).unwrap()),
            format!("private key {key} does not match the certificate {cert}"),
        ),
        (
            "expired certificate",
            Box::new(|| write_in_place(&pki, &files, &expired)),
            format!("certificate file {cert}: #1 (CN=localhost) expired on"),
        ),
        (
            "incomplete chain",
            Box::new(|| {
                std::fs::write(&files.cert, &foreign.cert_pem).unwrap();
                std::fs::write(&files.key, &foreign.key_pem).unwrap();
            }),
            format!("certificate file {cert}: the chain is incomplete"),
        ),
    ];
    let mut serving = first.serial_hex.clone();
    for (name, break_files, message) in &cases {
        break_files();
        wait_lines(&process, message, 1).await;
        assert_eq!(
            serial(process.https, &root).await,
            serving,
            "{name}: the last good chain must stay served"
        );
        let fixed = pki.leaf(NAMES);
        write_in_place(&pki, &files, &fixed);
        let latency = wait_serial(process.https, &root, &fixed.serial_hex, Instant::now()).await;
        eprintln!("{name}: refused and logged; fixed files served after {latency:?}");
        assert_eq!(count_lines(&process, message), 1, "{name} logged once");
        serving = fixed.serial_hex;
    }
    assert_eq!(
        count_lines(&process, "certificate reload refused"),
        cases.len()
    );

    // Counted on the admin listener, which shows the chain served now.
    let admin = process.admin.expect("admin listener");
    let metrics = common::plain_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        format!(
            "gatehouse_certificate_reloads_total{{outcome=\"failure\"}} {}\n",
            cases.len()
        ),
        format!(
            "gatehouse_certificate_reloads_total{{outcome=\"success\"}} {}\n",
            cases.len()
        ),
    ] {
        assert!(metrics.contains(&expected), "{expected} in:\n{metrics}");
    }
    let expiry = metrics
        .lines()
        .find(|line| line.starts_with("gatehouse_certificate_expiry_seconds{"))
        .unwrap_or_default();
    let served: String = serving
        .as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    assert!(expiry.contains(&served), "{served} in {expiry}");
}

/// Accepts any server certificate: for reading what is served to names it does not cover.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The serial served for `sni` (`None`: no SNI at all), whatever the certificate covers.
async fn serial_for(addr: SocketAddr, sni: Option<&str>) -> String {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    // rustls sends no SNI for an IP address.
    let name = ServerName::try_from(sni.unwrap_or("127.0.0.1").to_owned()).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    common::serial_hex(&tls.get_ref().1.peer_certificates().unwrap()[0])
}

/// Polls until `sni` is served `expected`; panics after `LIMIT`.
async fn wait_serial_for(addr: SocketAddr, sni: &str, expected: &str) -> Duration {
    let since = Instant::now();
    while since.elapsed() < LIMIT {
        if serial_for(addr, Some(sni)).await == expected {
            return since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{sni}: serial {expected} not served within {LIMIT:?}");
}

#[tokio::test]
async fn sni_certificates_reload_independently_and_failures_are_counted() {
    let pki = Pki::new("reload-sni");
    let a_first = pki.leaf(&["a.test", "127.0.0.1"]);
    let b_first = pki.leaf(&["b.test", "*.b.test"]);
    let a = pki.write("a", &a_first);
    let b = pki.write("b", &b_first);
    let upstream = Upstream::start().await;
    let config = format!(
        r#"[listen]
https = "127.0.0.1:0"

[tls]
[[tls.certificates]]
cert = "{a_cert}"
key = "{a_key}"
ca_bundle = "{bundle}"
names = ["a.test"]

[[tls.certificates]]
cert = "{b_cert}"
key = "{b_key}"
ca_bundle = "{bundle}"
names = ["b.test", "*.b.test"]

[upstream]
url = "http://{upstream}"

[log]
access_log = false
"#,
        a_cert = a.cert.display(),
        a_key = a.key.display(),
        b_cert = b.cert.display(),
        b_key = b.key.display(),
        bundle = a.bundle.display(),
        upstream = upstream.addr,
    );
    // In-process: the binary adds nothing here, and the metrics are at hand.
    common::init();
    let path = pki.dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let gateway = gatehouse::Gateway::bind(gatehouse::Config::load(&path).unwrap())
        .await
        .unwrap();
    let addr = gateway.https_addr();
    let metrics = gateway.metrics();
    let store = gateway.certificates();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(gateway.run(shutdown.clone()));

    let expect = |a: &Leaf, b: &Leaf| {
        let (a, b) = (a.serial_hex.clone(), b.serial_hex.clone());
        async move {
            assert_eq!(serial_for(addr, Some("a.test")).await, a, "a.test");
            assert_eq!(serial_for(addr, Some("b.test")).await, b, "b.test");
            assert_eq!(serial_for(addr, Some("www.b.test")).await, b, "www.b.test");
            assert_eq!(
                serial_for(addr, Some("unknown.test")).await,
                a,
                "unknown SNI"
            );
            assert_eq!(serial_for(addr, None).await, a, "no SNI");
        }
    };
    expect(&a_first, &b_first).await;

    // Rotate b alone, then a alone.
    let b_second = pki.leaf(&["b.test", "*.b.test"]);
    write_in_place(&pki, &b, &b_second);
    let latency = wait_serial_for(addr, "b.test", &b_second.serial_hex).await;
    eprintln!("reload latency, SNI slot b: {latency:?}");
    expect(&a_first, &b_second).await;
    let a_second = pki.leaf(&["a.test", "127.0.0.1"]);
    write_renamed(&pki, &a, &a_second);
    let latency = wait_serial_for(addr, "a.test", &a_second.serial_hex).await;
    eprintln!("reload latency, SNI slot a: {latency:?}");
    expect(&a_second, &b_second).await;

    // A b certificate that no longer covers its configured names is refused; a keeps
    // reloading meanwhile.
    let wrong = pki.leaf(&["c.test"]);
    write_in_place(&pki, &b, &wrong);
    let a_third = pki.leaf(&["a.test", "127.0.0.1"]);
    write_in_place(&pki, &a, &a_third);
    wait_serial_for(addr, "a.test", &a_third.serial_hex).await;
    let deadline = Instant::now() + LOG_WAIT;
    let mut rendered = metrics.render(&store, 0);
    while !rendered.contains("gatehouse_certificate_reloads_total{outcome=\"failure\"} 1\n") {
        assert!(Instant::now() < deadline, "{rendered}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        rendered = metrics.render(&store, 0);
    }
    assert!(
        rendered.contains("gatehouse_certificate_reloads_total{outcome=\"success\"} 3\n"),
        "{rendered}"
    );
    expect(&a_third, &b_second).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// One request on a new TLS connection; returns the serial served on it.
async fn request_on_new_connection(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> Result<String, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let serial = common::serial_hex(&tls.get_ref().1.peer_certificates().unwrap()[0]);
    let response = get(&mut tls).await?;
    if response.starts_with("HTTP/1.1 200") {
        Ok(serial)
    } else {
        Err(format!(
            "response: {}",
            response.lines().next().unwrap_or_default()
        ))
    }
}

/// Sends `GET /` with `Connection: close` and reads the response to its end.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<String, String> {
    stream
        .write_all(b"GET /load HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .map_err(|_| "response timeout".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continuous_load_sees_no_failure_during_20_rotations() {
    const CLIENTS: usize = 4;
    const ROTATIONS: usize = 20;
    let pki = Pki::new("reload-load");
    let (first, files) = pki.localhost("site");
    let upstream = Upstream::start().await;
    let process = start(&pki, &base_config(&files, upstream.addr));
    let root = pki.root_pem();
    let addr = process.https;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        // Even clients do full handshakes (the resolver picks the chain every time); odd
        // ones resume sessions like browsers do, across rotations.
        let mut config = (*tls_client_config(&root, &[b"http/1.1"])).clone();
        if client % 2 == 0 {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let connector = TlsConnector::from(Arc::new(config));
        let (stop, failures) = (stop.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            let mut ok = 0usize;
            let mut serials = HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                match request_on_new_connection(addr, &connector).await {
                    Ok(serial) => {
                        ok += 1;
                        serials.insert(serial);
                    }
                    Err(err) => failures.lock().unwrap().push(err),
                }
            }
            (
                ok,
                if client % 2 == 0 {
                    serials
                } else {
                    HashSet::default()
                },
            )
        }));
    }

    let mut latencies = Vec::new();
    let mut expected = vec![first.serial_hex.clone()];
    tokio::time::sleep(Duration::from_millis(200)).await;
    for rotation in 0..ROTATIONS {
        let new = pki.leaf(NAMES);
        if rotation % 2 == 0 {
            write_in_place(&pki, &files, &new);
        } else {
            write_renamed(&pki, &files, &new);
        }
        latencies.push(wait_serial(addr, &root, &new.serial_hex, Instant::now()).await);
        expected.push(new.serial_hex);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    let mut seen = HashSet::new();
    for client in clients {
        let (ok, serials) = client.await.unwrap();
        requests += ok;
        seen.extend(serials);
    }
    let failures = failures.lock().unwrap().clone();
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / u32::try_from(latencies.len()).unwrap();
    eprintln!(
        "under load ({CLIENTS} clients, new TLS connection per request): {requests} requests, {} failed, {} distinct serials seen by full handshakes, {ROTATIONS} rotations; reload latency min {:?} median {:?} mean {mean:?} max {:?}",
        failures.len(),
        seen.len(),
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    // Refusals would be a half-written pair caught between two writes: legitimate, and
    // invisible to clients; reported for the record.
    eprintln!(
        "under load: {} reload(s) refused",
        count_lines(&process, "certificate reload refused")
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(requests > 100, "only {requests} requests completed");
    assert!(
        seen.len() > ROTATIONS / 2,
        "full handshakes saw only {} of {} chains",
        seen.len(),
        ROTATIONS + 1
    );
    assert!(
        seen.iter().all(|serial| expected.contains(serial)),
        "an unexpected certificate was served"
    );
    assert_eq!(count_lines(&process, "certificate reloaded"), ROTATIONS);
}

#[test]
fn reload_settings_are_validated() {
    let pki = Pki::new("reload-config");
    let (_, files) = pki.localhost("site");
    let upstream: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    let path = pki.dir.join("gateway.toml");
    let parse = |lines: &str| {
        gatehouse::Config::parse(&with_tls(&base_config(&files, upstream), lines), &path)
    };

    let config = parse("").unwrap();
    assert_eq!(config.tls.reload_poll_interval, Duration::from_secs(30));
    assert!(config.tls.reload_watch);
    let config = parse("reload_watch = false\nreload_poll_interval = \"0s\"").unwrap();
    assert!(config.tls.reload_poll_interval.is_zero());
    assert!(!config.tls.reload_watch);

    let err = parse("reload_poll_interval = \"10ms\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls.reload_poll_interval"), "{err}");
    assert!(err.contains("\"0s\" to poll never"), "{err}");
    let err = parse("reload_watch = \"no\"").unwrap_err().to_string();
    assert!(err.contains("reload_watch"), "{err}");
}

#[tokio::test]
async fn certificates_near_expiry_are_warned_about_at_startup_and_on_reload() {
    let pki = Pki::new("reload-expiring");
    let now = time::OffsetDateTime::now_utc();
    let soon = |days| pki.leaf_valid(NAMES, now - time::Duration::days(1), now + days);
    let first = soon(time::Duration::days(5) + time::Duration::hours(1));
    let files = pki.write("site", &first);
    let upstream = Upstream::start().await;
    let process = start(&pki, &base_config(&files, upstream.addr));
    wait_lines(&process, "expires in 5 days", 1).await;

    let next = soon(time::Duration::days(3) + time::Duration::hours(1));
    write_renamed(&pki, &files, &next);
    wait_serial(
        process.https,
        &pki.root_pem(),
        &next.serial_hex,
        Instant::now(),
    )
    .await;
    // Still served (renewing late beats not renewing), with a warning.
    wait_lines(&process, "expires in 3 days", 1).await;
}

/// Writes `leaf` as `dir/site.crt` and `dir/site.key`.
fn write_into(pki: &Pki, dir: &Path, leaf: &Leaf) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("site.crt"), chain_pem(pki, leaf)).unwrap();
    std::fs::write(dir.join("site.key"), &leaf.key_pem).unwrap();
}

#[tokio::test]
async fn a_replaced_certificate_directory_is_watched_again() {
    let pki = Pki::new("reload-dir-replaced");
    let (_, mut files) = pki.localhost("unused");
    let live = pki.dir.join("live");
    let first = pki.leaf(NAMES);
    write_into(&pki, &live, &first);
    files.cert = live.join("site.crt");
    files.key = live.join("site.key");
    let upstream = Upstream::start().await;
    let process = start(&pki, &base_config(&files, upstream.addr));
    let root = pki.root_pem();
    assert_eq!(serial(process.https, &root).await, first.serial_hex);

    // The directory moved aside and a new one moved in.
    let second = pki.leaf(NAMES);
    write_into(&pki, &pki.dir.join("live.new"), &second);
    std::fs::rename(&live, pki.dir.join("live.old")).unwrap();
    std::fs::rename(pki.dir.join("live.new"), &live).unwrap();
    let latency = wait_serial(process.https, &root, &second.serial_hex, Instant::now()).await;
    eprintln!("reload latency, directory replaced by rename: {latency:?}");

    // Deleted and created again.
    std::fs::remove_dir_all(&live).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(serial(process.https, &root).await, second.serial_hex);
    let third = pki.leaf(NAMES);
    write_into(&pki, &live, &third);
    let latency = wait_serial(process.https, &root, &third.serial_hex, Instant::now()).await;
    eprintln!("reload latency, directory deleted and created again: {latency:?}");

    // The new directory is watched: an in-place change inside it is seen.
    let fourth = pki.leaf(NAMES);
    write_into(&pki, &live, &fourth);
    wait_serial(process.https, &root, &fourth.serial_hex, Instant::now()).await;
}

#[tokio::test]
async fn a_swapped_directory_symlink_is_followed() {
    let pki = Pki::new("reload-dir-symlink");
    let (_, mut files) = pki.localhost("unused");
    let first = pki.leaf(NAMES);
    write_into(&pki, &pki.dir.join("v1"), &first);
    let current = pki.dir.join("current");
    std::os::unix::fs::symlink("v1", &current).unwrap();
    files.cert = current.join("site.crt");
    files.key = current.join("site.key");
    let upstream = Upstream::start().await;
    let process = start(&pki, &base_config(&files, upstream.addr));
    let root = pki.root_pem();
    assert_eq!(serial(process.https, &root).await, first.serial_hex);

    // `ln -sfn v2 current`, atomically.
    let second = pki.leaf(NAMES);
    write_into(&pki, &pki.dir.join("v2"), &second);
    std::os::unix::fs::symlink("v2", pki.dir.join("current.tmp")).unwrap();
    std::fs::rename(pki.dir.join("current.tmp"), &current).unwrap();
    let latency = wait_serial(process.https, &root, &second.serial_hex, Instant::now()).await;
    eprintln!("reload latency, directory symlink swapped: {latency:?}");

    // Changes inside the directory now linked are seen, not those in the old one.
    write_into(&pki, &pki.dir.join("v1"), &pki.leaf(NAMES));
    let third = pki.leaf(NAMES);
    write_into(&pki, &pki.dir.join("v2"), &third);
    wait_serial(process.https, &root, &third.serial_hex, Instant::now()).await;
}
