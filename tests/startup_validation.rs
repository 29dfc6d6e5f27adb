//! Startup validation through the real binary (issue 2): every broken certificate set is
//! refused by `gatehouse --config X` (which must exit, never listen) and by
//! `gatehouse check --config X`, with exit 65 for certificates and 64 for configuration,
//! and a message that names the file and says what to do. Good sets, the bundle-completed
//! chain and the repo's own `gateway.toml` pass.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{binary, spawn_binary_blocking, tls_client_config, wait_child, Leaf, Pki};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;

const EXIT_CONFIG: i32 = 64;
const EXIT_CERTIFICATE: i32 = 65;

/// What one run of the binary did.
struct Run {
    code: Option<i32>,
    /// stdout then stderr.
    output: String,
}

/// Runs `gatehouse ARGS` with output captured in files under `dir`; a process still
/// running after 20 s is killed and fails the test (a broken set must never be served).
fn run_in(dir: &Path, args: &[&str]) -> Run {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let (out_path, err_path) = (
        dir.join(format!("run-{n}.stdout")),
        dir.join(format!("run-{n}.stderr")),
    );
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("GATEHOUSE_CONFIG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let Some(status) = wait_child(&mut child, Duration::from_secs(20)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "gatehouse {args:?} still running after 20 s; it must exit instead:\n{}{}",
            std::fs::read_to_string(&out_path).unwrap_or_default(),
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
    };
    let code = status.code();
    let output = format!(
        "{}{}",
        std::fs::read_to_string(&out_path).unwrap(),
        std::fs::read_to_string(&err_path).unwrap()
    );
    Run { code, output }
}

/// Writes a config using `cert`, `key` and optionally `bundle`, plus `extra_tls` lines in
/// `[tls]`; listeners on port 0; the upstream is never contacted.
fn write_config(
    dir: &Path,
    name: &str,
    cert: &Path,
    key: &Path,
    bundle: Option<&Path>,
    extra_tls: &str,
) -> PathBuf {
    let bundle = bundle.map_or(String::new(), |b| {
        format!("ca_bundle = '{}'\n", b.display())
    });
    let text = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n\n\
         [tls]\ncert = '{}'\nkey = '{}'\n{bundle}{extra_tls}\n\n\
         [upstream]\nurl = \"http://127.0.0.1:9\"\n\n[log]\naccess_log = false\n",
        cert.display(),
        key.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Both the gateway and `check` refuse `config` with `code`, and their output contains
/// every one of `needles` (the file and the fix).
fn assert_refused(config: &Path, code: i32, needles: &[&str]) {
    let dir = config.parent().unwrap();
    let path = config.to_str().unwrap();
    for args in [&["--config", path][..], &["check", "--config", path][..]] {
        let run = run_in(dir, args);
        assert_eq!(
            run.code,
            Some(code),
            "gatehouse {args:?} exit code; output:\n{}",
            run.output
        );
        for needle in needles {
            assert!(
                run.output.contains(needle),
                "gatehouse {args:?}: output lacks {needle:?}:\n{}",
                run.output
            );
        }
        assert!(
            !run.output.contains("gatehouse listening"),
            "gatehouse {args:?} listened with a broken set:\n{}",
            run.output
        );
        if args[0] == "check" && code == EXIT_CERTIFICATE {
            assert!(
                run.output.contains("verdict:   FAIL") && run.output.contains("result: FAIL"),
                "check must print a FAIL verdict:\n{}",
                run.output
            );
        }
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

fn cert_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A localhost leaf from `pki`, its `leaf.key` and the leaf-only `leaf-only.crt`.
fn leaf_files(pki: &Pki) -> (Leaf, PathBuf, PathBuf) {
    let leaf = pki.leaf(&["localhost", "127.0.0.1"]);
    let key = write(&pki.dir, "leaf.key", &leaf.key_pem);
    let only = write(&pki.dir, "leaf-only.crt", &leaf.cert_pem);
    (leaf, key, only)
}

/// Opens a TLS connection trusting only `root_pem` and returns the served chain (DER).
fn served_chain(addr: SocketAddr, root_pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let config = tls_client_config(root_pem, &[b"http/1.1"]);
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(conn
        .peer_certificates()
        .ok_or("no certificates")?
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

// 1. -------------------------------------------------------------------------------------

#[test]
fn missing_or_unreadable_files_are_named() {
    let pki = Pki::new("sv-missing");
    let (_, files) = pki.localhost("site");
    let missing = pki.dir.join("nowhere.crt");
    let config = write_config(&pki.dir, "c1", &missing, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}: cannot read it", show(&missing)),
            "No such file",
            "check the path in the config",
        ],
    );

    // Tests run as root here, so permissions cannot make a file unreadable; a directory
    // where the key should be is unreadable for everyone.
    let directory = pki.dir.join("key-is-a-dir");
    std::fs::create_dir_all(&directory).unwrap();
    let config = write_config(&pki.dir, "c2", &files.cert, &directory, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("private key file {}: cannot read it", show(&directory)),
            "file permissions",
        ],
    );

    let bundle = pki.dir.join("no-bundle.crt");
    let config = write_config(&pki.dir, "c3", &files.cert, &files.key, Some(&bundle), "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[&format!("CA bundle file {}: cannot read it", show(&bundle))],
    );
}

// 2. -------------------------------------------------------------------------------------

#[test]
fn empty_files_are_named() {
    let pki = Pki::new("sv-empty");
    let (_, files) = pki.localhost("site");
    let empty = write(&pki.dir, "empty.crt", "");
    let config = write_config(&pki.dir, "c1", &empty, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {} is empty", show(&empty)),
            "copy the certificate again",
            &format!("head -n 2 {}", show(&empty)),
        ],
    );

    let blank = write(&pki.dir, "blank.key", "\n  \n");
    let config = write_config(&pki.dir, "c2", &files.cert, &blank, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("private key file {} is empty", show(&blank)),
            "copy the private key again",
        ],
    );
}

// 3. -------------------------------------------------------------------------------------

#[test]
fn files_without_pem_say_what_they_look_like() {
    let pki = Pki::new("sv-notpem");
    let (leaf, files) = pki.localhost("site");

    let der = write(&pki.dir, "site.der.crt", cert_der(&leaf.cert_pem));
    let config = write_config(&pki.dir, "c1", &der, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {} holds no PEM block", show(&der)),
            "binary DER",
            &format!("openssl x509 -inform der -in {}", show(&der)),
        ],
    );

    let html = write(
        &pki.dir,
        "login-page.crt",
        "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n<body>Session expired, please log in again.</body></html>\n",
    );
    let config = write_config(&pki.dir, "c2", &html, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {} holds no PEM block", show(&html)),
            "HTML page",
            "download the file again",
        ],
    );

    let key_der = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let der_key = write(&pki.dir, "site.der.key", key_der.secret_der());
    let config = write_config(&pki.dir, "c3", &files.cert, &der_key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("private key file {} holds no PEM block", show(&der_key)),
            "binary DER",
            &format!("openssl pkey -inform der -in {}", show(&der_key)),
        ],
    );
}

#[test]
fn truncated_pem_says_so() {
    let pki = Pki::new("sv-truncated");
    let (leaf, files) = pki.localhost("site");
    let truncated = write(&pki.dir, "truncated.crt", &leaf.cert_pem[..200]);
    let config = write_config(&pki.dir, "c1", &truncated, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}: broken PEM", show(&truncated)),
            "no -----END CERTIFICATE----- line",
            "copy it again",
        ],
    );
}

/// Files as Windows editors, `openssl x509 -text` and `openssl ecparam -genkey` write them
/// are accepted: a doctor that refuses good files is as bad as one that passes broken ones.
#[test]
fn pem_as_common_tools_write_it_is_accepted() {
    let pki = Pki::new("sv-tools");
    let (leaf, files) = pki.localhost("site");
    let chain = std::fs::read_to_string(&files.cert).unwrap();

    let crlf_cert = write(&pki.dir, "crlf.crt", chain.replace('\n', "\r\n"));
    let crlf_key = write(&pki.dir, "crlf.key", leaf.key_pem.replace('\n', "\r\n"));
    let bom_cert = write(&pki.dir, "bom.crt", format!("\u{feff}{chain}"));
    let bom_key = write(&pki.dir, "bom.key", format!("\u{feff}{}", leaf.key_pem));
    let text_cert = write(
        &pki.dir,
        "text.crt",
        format!("Certificate:\n    Data:\n        Version: 3 (0x2)\n{chain}"),
    );
    // SEC1 with the EC PARAMETERS block `openssl ecparam -genkey` puts first.
    let sec1 = Command::new("openssl")
        .args(["ec", "-in", files.key.to_str().unwrap()])
        .stderr(Stdio::null())
        .output()
        .expect("openssl must be installed");
    let params = Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1"])
        .output()
        .unwrap();
    let sec1_key = write(&pki.dir, "sec1.key", [params.stdout, sec1.stdout].concat());
    assert!(std::fs::read_to_string(&sec1_key)
        .unwrap()
        .contains("-----BEGIN EC PRIVATE KEY-----"));

    for (name, cert, key) in [
        ("crlf", &crlf_cert, &crlf_key),
        ("bom", &bom_cert, &bom_key),
        ("text", &text_cert, &files.key),
        ("sec1", &files.cert, &sec1_key),
    ] {
        let config = write_config(&pki.dir, name, cert, key, Some(&files.bundle), "");
        let run = run_in(&pki.dir, &["check", "--config", config.to_str().unwrap()]);
        assert_eq!(run.code, Some(0), "{name}: {}", run.output);
        assert!(
            run.output.contains("subject:   CN=localhost")
                && run
                    .output
                    .contains("chain:     CN=localhost <- CN=sv-tools Test Intermediate"),
            "{name}: {}",
            run.output
        );
    }
}

// 4. -------------------------------------------------------------------------------------

#[test]
fn key_and_certificate_in_each_others_place() {
    let pki = Pki::new("sv-swapped");
    let (_, files) = pki.localhost("site");

    let config = write_config(&pki.dir, "c1", &files.key, &files.cert, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "certificate file {} holds a private key and no certificate",
                show(&files.key)
            ),
            "swapped",
            "set cert to the certificate chain",
        ],
    );

    let config = write_config(&pki.dir, "c2", &files.cert, &files.cert, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "private key file {} holds a certificate and no private key",
                show(&files.cert)
            ),
            "swapped",
        ],
    );
}

// 5. -------------------------------------------------------------------------------------

#[test]
fn key_not_matching_the_leaf_names_both_files() {
    let pki = Pki::new("sv-mismatch");
    let (_, files) = pki.localhost("site");
    let other = pki.leaf(&["localhost"]);
    let other_key = write(&pki.dir, "other.key", &other.key_pem);
    let config = write_config(&pki.dir, "c1", &files.cert, &other_key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "private key {} does not match the certificate {}",
                show(&other_key),
                show(&files.cert)
            ),
            "use the key generated with this certificate's request",
        ],
    );
}

// 6. -------------------------------------------------------------------------------------

#[test]
fn chains_out_of_order_are_refused() {
    let pki = Pki::new("sv-order");
    let (leaf, key, _) = leaf_files(&pki);

    let reversed = write(
        &pki.dir,
        "reversed.crt",
        format!("{}{}", pki.intermediate_pem(), leaf.cert_pem),
    );
    let config = write_config(&pki.dir, "c1", &reversed, &key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}", show(&reversed)),
            "is #2 but must come first",
            "cat server.crt intermediate.crt > fullchain.crt",
        ],
    );

    let root_first = write(
        &pki.dir,
        "root-first.crt",
        format!(
            "{}{}{}",
            leaf.cert_pem,
            pki.root_pem(),
            pki.intermediate_pem()
        ),
    );
    let config = write_config(&pki.dir, "c2", &root_first, &key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "certificate file {}: certificates are out of order",
                show(&root_first)
            ),
            "order the file leaf first",
        ],
    );

    // An intermediate from another CA that did not issue the leaf.
    let stranger = Pki::new("sv-order-stranger");
    let unrelated = write(
        &pki.dir,
        "unrelated.crt",
        format!("{}{}", leaf.cert_pem, stranger.intermediate_pem()),
    );
    let config = write_config(&pki.dir, "c3", &unrelated, &key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}: #2", show(&unrelated)),
            "did not issue #1",
            "append the real intermediate",
        ],
    );

    // An intermediate with the right name but another key (an older CA generation): only
    // the signature tells them apart.
    let lookalike = Pki::new("sv-order");
    let lookalike_chain = write(
        &pki.dir,
        "lookalike.crt",
        format!("{}{}", leaf.cert_pem, lookalike.intermediate_pem()),
    );
    let config = write_config(&pki.dir, "c4", &lookalike_chain, &key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "certificate file {}: the signature on #1 does not verify",
                show(&lookalike_chain)
            ),
            "download the current chain from your CA",
        ],
    );

    // Further up: the root appended to the file is the look-alike's.
    let wrong_root = write(
        &pki.dir,
        "wrong-root.crt",
        format!(
            "{}{}{}",
            leaf.cert_pem,
            pki.intermediate_pem(),
            lookalike.root_pem()
        ),
    );
    let config = write_config(&pki.dir, "c6", &wrong_root, &key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[&format!(
            "certificate file {}: the signature on #2 does not verify",
            show(&wrong_root)
        )],
    );

    // The same, with the right intermediate in ca_bundle: clients only get the served
    // chain, so the bundle's intermediate must not vouch for the wrong one in the file.
    let bundle = write(
        &pki.dir,
        "bundle.crt",
        format!("{}{}", pki.intermediate_pem(), pki.root_pem()),
    );
    let config = write_config(&pki.dir, "c5", &lookalike_chain, &key, Some(&bundle), "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "certificate file {}: the signature on #1 does not verify",
                show(&lookalike_chain)
            ),
            "download the current chain from your CA",
        ],
    );
}

// 7. -------------------------------------------------------------------------------------

#[test]
fn incomplete_chain_is_refused_when_the_issuer_is_nowhere() {
    let pki = Pki::new("sv-incomplete");
    let (_, key, only) = leaf_files(&pki);

    let config = write_config(&pki.dir, "c1", &only, &key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}: the chain is incomplete", show(&only)),
            "no ca_bundle is configured",
            &format!(
                "append the intermediate certificate(s) from your CA to {}",
                show(&only)
            ),
            "set ca_bundle",
        ],
    );

    let root_only = write(&pki.dir, "root-only.crt", pki.root_pem());
    let config = write_config(&pki.dir, "c2", &only, &key, Some(&root_only), "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}: the chain is incomplete", show(&only)),
            "neither in the file nor in the CA bundle",
        ],
    );
}

#[test]
fn incomplete_chain_is_completed_from_the_ca_bundle() {
    let pki = Pki::new("sv-complete");
    let (_, key, only) = leaf_files(&pki);
    let bundle = write(
        &pki.dir,
        "bundle.crt",
        format!("{}{}", pki.intermediate_pem(), pki.root_pem()),
    );
    let config = write_config(&pki.dir, "c1", &only, &key, Some(&bundle), "");

    let check = run_in(&pki.dir, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(check.code, Some(0), "{}", check.output);
    assert!(
        check
            .output
            .contains("1 intermediate certificate(s) missing from"),
        "check should say the chain was completed:\n{}",
        check.output
    );

    let gateway = spawn_binary_blocking(&config);
    let chain = served_chain(gateway.https, &pki.root_pem())
        .unwrap_or_else(|err| panic!("a client trusting only the root must connect: {err}"));
    assert_eq!(chain.len(), 2, "served chain: leaf + intermediate");
    assert_eq!(chain[1], pki.intermediate.der().to_vec());

    // Control: the same client fails without the intermediate, so the check above means
    // something.
    let stranger = Pki::new("sv-complete-stranger");
    assert!(served_chain(gateway.https, &stranger.root_pem()).is_err());
}

#[test]
fn leaf_signed_directly_by_a_root_in_the_bundle_is_not_called_self_signed() {
    let pki = Pki::new("sv-root-signed");
    let now = time::OffsetDateTime::now_utc();
    let leaf = pki.leaf_signed_by(&["localhost"], now - days(1), now + days(90), &pki.root);
    let cert = write(&pki.dir, "direct.crt", &leaf.cert_pem);
    let key = write(&pki.dir, "direct.key", &leaf.key_pem);
    let bundle = write(&pki.dir, "roots.crt", pki.root_pem());
    let config = write_config(&pki.dir, "c1", &cert, &key, Some(&bundle), "");

    let check = run_in(&pki.dir, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(check.code, Some(0), "{}", check.output);
    assert!(!check.output.contains("self-signed"), "{}", check.output);

    // Control: a leaf that really signed itself is still called self-signed.
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = now - days(1);
    params.not_after = now + days(90);
    let own_key = rcgen::KeyPair::generate().unwrap();
    let own = params.self_signed(&own_key).unwrap();
    let cert = write(&pki.dir, "own.crt", own.pem());
    let key = write(&pki.dir, "own.key", own_key.serialize_pem());
    let config = write_config(&pki.dir, "c2", &cert, &key, None, "");
    let check = run_in(&pki.dir, &["check", "--config", config.to_str().unwrap()]);
    assert!(check.output.contains("self-signed"), "{}", check.output);
}

// 8. -------------------------------------------------------------------------------------

#[test]
fn expired_and_not_yet_valid_certificates_are_refused() {
    let pki = Pki::new("sv-validity");
    let now = OffsetDateTime::now_utc();

    let expired = pki.leaf_valid(&["localhost"], now - days(100), now - days(10));
    let files = pki.write("expired", &expired);
    let config = write_config(&pki.dir, "c1", &files.cert, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}: #1", show(&files.cert)),
            "expired on",
            "renew it",
        ],
    );

    let future = pki.leaf_valid(&["localhost"], now + days(10), now + days(100));
    let files = pki.write("future", &future);
    let config = write_config(&pki.dir, "c2", &files.cert, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}: #1", show(&files.cert)),
            "is not valid before",
            "check the machine clock",
        ],
    );
}

#[test]
fn certificate_expiring_within_14_days_warns_and_starts() {
    let pki = Pki::new("sv-soon");
    let now = OffsetDateTime::now_utc();
    // Half a day past the boundary, so the whole days left are 10 however fast this runs.
    let soon = pki.leaf_valid(
        &["localhost"],
        now - days(80),
        now + days(10) + time::Duration::hours(12),
    );
    let files = pki.write("soon", &soon);
    let config = write_config(&pki.dir, "c1", &files.cert, &files.key, None, "");

    let check = run_in(&pki.dir, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(check.code, Some(0), "{}", check.output);
    assert!(
        check.output.contains("(10 days left)")
            && check.output.contains("warning:   expires in 10 days")
            && check.output.contains("verdict:   OK with warnings"),
        "{}",
        check.output
    );

    let gateway = spawn_binary_blocking(&config);
    assert!(
        gateway.output().contains("expires in 10 days"),
        "the gateway must warn at startup:\n{}",
        gateway.output()
    );
    assert!(served_chain(gateway.https, &pki.root_pem()).is_ok());
}

// 9. -------------------------------------------------------------------------------------

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl must be installed to generate encrypted keys");
    assert!(status.success(), "openssl {args:?} failed");
}

#[test]
fn encrypted_private_keys_say_how_to_decrypt() {
    let pki = Pki::new("sv-encrypted");
    let (_, files) = pki.localhost("site");
    let key = show(&files.key);

    let pkcs8 = pki.dir.join("pkcs8-encrypted.key");
    openssl(&[
        "pkcs8",
        "-topk8",
        "-v2",
        "aes256",
        "-passout",
        "pass:x",
        "-in",
        &key,
        "-out",
        pkcs8.to_str().unwrap(),
    ]);
    assert!(std::fs::read_to_string(&pkcs8)
        .unwrap()
        .starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));

    let traditional = pki.dir.join("traditional-encrypted.key");
    openssl(&[
        "ec",
        "-aes256",
        "-passout",
        "pass:x",
        "-in",
        &key,
        "-out",
        traditional.to_str().unwrap(),
    ]);
    assert!(std::fs::read_to_string(&traditional)
        .unwrap()
        .contains("Proc-Type: 4,ENCRYPTED"));

    for (name, encrypted) in [("c1", &pkcs8), ("c2", &traditional)] {
        let config = write_config(&pki.dir, name, &files.cert, encrypted, None, "");
        assert_refused(
            &config,
            EXIT_CERTIFICATE,
            &[
                &format!(
                    "private key file {} is encrypted with a passphrase",
                    show(encrypted)
                ),
                &format!("openssl pkey -in {}", show(encrypted)),
            ],
        );
    }
}

// 10. ------------------------------------------------------------------------------------

#[test]
fn ca_bundle_of_another_ca_is_refused() {
    let pki = Pki::new("sv-bundle");
    let (_, files) = pki.localhost("site");
    let other = Pki::new("sv-bundle-other");
    let other_bundle = write(
        &pki.dir,
        "other-bundle.crt",
        format!("{}{}", other.intermediate_pem(), other.root_pem()),
    );
    let config = write_config(
        &pki.dir,
        "c1",
        &files.cert,
        &files.key,
        Some(&other_bundle),
        "",
    );
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "certificate file {} does not lead to any CA in the CA bundle {}",
                show(&files.cert),
                show(&other_bundle)
            ),
            "download the bundle that belongs to this certificate",
        ],
    );

    // A bundle from a CA with the same names but other keys (an old generation): only the
    // signatures tell it apart, and the message must still blame the bundle.
    let lookalike = Pki::new("sv-bundle");
    let lookalike_bundle = write(
        &pki.dir,
        "lookalike-bundle.crt",
        format!("{}{}", lookalike.intermediate_pem(), lookalike.root_pem()),
    );
    let config = write_config(
        &pki.dir,
        "c2",
        &files.cert,
        &files.key,
        Some(&lookalike_bundle),
        "",
    );
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "certificate file {} does not lead to any CA in the CA bundle {}",
                show(&files.cert),
                show(&lookalike_bundle)
            ),
            "download the bundle that belongs to this certificate",
        ],
    );
}

// names -----------------------------------------------------------------------------------

#[test]
fn configured_name_not_covered_by_the_leaf_is_refused() {
    let pki = Pki::new("sv-names");
    let (_, files) = pki.localhost("site");
    for (name, entry) in [("c1", "www.example.com"), ("c2", "*.example.com")] {
        let config = write_config(
            &pki.dir,
            name,
            &files.cert,
            &files.key,
            Some(&files.bundle),
            &format!("names = [\"localhost\", \"{entry}\"]"),
        );
        assert_refused(
            &config,
            EXIT_CERTIFICATE,
            &[
                &format!(
                    "certificate file {} does not cover the name {entry}",
                    show(&files.cert)
                ),
                "it covers: localhost, 127.0.0.1",
                &format!("request a certificate that includes {entry}"),
            ],
        );
    }
}

// check on good sets, config errors, the repo's config -------------------------------------

#[test]
fn check_prints_the_report_for_a_good_set() {
    let pki = Pki::new("sv-good");
    let now = OffsetDateTime::now_utc();
    let leaf = pki.leaf_valid(
        &["localhost", "127.0.0.1"],
        now - days(1),
        now + days(90) + time::Duration::hours(12),
    );
    let files = pki.write("site", &leaf);
    let config = write_config(
        &pki.dir,
        "c1",
        &files.cert,
        &files.key,
        Some(&files.bundle),
        "names = [\"localhost\"]",
    );
    let run = run_in(&pki.dir, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.output);
    let expected = [
        format!("certificate {}", show(&files.cert)),
        "subject:   CN=localhost".to_owned(),
        "names:     localhost, 127.0.0.1".to_owned(),
        "chain:     CN=localhost <- CN=sv-good Test Intermediate <- CN=sv-good Test Root"
            .to_owned(),
        "(90 days left)".to_owned(),
        "key:       ECDSA P-256".to_owned(),
        "verdict:   OK\n".to_owned(),
        "result: OK".to_owned(),
    ];
    for line in &expected {
        assert!(
            run.output.contains(line.as_str()),
            "lacks {line:?}:\n{}",
            run.output
        );
    }
    assert!(!run.output.contains("warning"), "{}", run.output);
    assert!(
        !run.output.contains("gatehouse listening"),
        "{}",
        run.output
    );
    // The serial printed is the leaf's (colon-separated hex).
    let serial = run
        .output
        .lines()
        .find_map(|line| line.trim().strip_prefix("serial:"))
        .unwrap()
        .trim()
        .replace(':', "");
    assert_eq!(
        serial.trim_start_matches('0'),
        leaf.serial_hex.trim_start_matches('0')
    );
}

#[test]
fn config_with_several_bad_keys_lists_them_all() {
    let pki = Pki::new("sv-config");
    let (_, files) = pki.localhost("site");
    let text = format!(
        "[listen]\nhttps = \"nowhere\"\npublic_https_port = 0\n\n\
         [tls]\ncert = '{}'\nkey = '{}'\nhandshake_timeout = \"soon\"\nmin_version = \"1.1\"\n\n\
         [upstream]\nurl = \"ftp://web:8000\"\n\n[log]\nformat = \"xml\"\n",
        files.cert.display(),
        files.key.display()
    );
    let config = write(&pki.dir, "bad.toml", text);
    assert_refused(
        &config,
        EXIT_CONFIG,
        &[
            &format!("{}: 6 problems", show(&config)),
            "listen.https: `nowhere` is not an ADDR:PORT",
            "listen.public_https_port: port 0",
            "tls.handshake_timeout: `soon` is not a duration",
            "tls.min_version: `1.1` is not supported; write \"1.2\"",
            "upstream.url: `ftp://web:8000`: only http://, https:// and unix: upstreams",
            "log.format: `xml` is not a log format",
        ],
    );

    // A cert without its key is one problem, named by the missing key.
    let half = write(
        &pki.dir,
        "half.toml",
        format!(
            "[listen]\nhttps = \"127.0.0.1:0\"\n[tls]\ncert = '{}'\n[upstream]\nurl = \"http://127.0.0.1:9\"\n",
            files.cert.display()
        ),
    );
    assert_refused(
        &half,
        EXIT_CONFIG,
        &[
            &format!("{}: 1 problem\n", show(&half)),
            "tls.key: tls.cert is set but tls.key is missing; add key =",
        ],
    );

    // A typo is named too.
    let typo = write(
        &pki.dir,
        "typo.toml",
        std::fs::read_to_string(write_config(
            &pki.dir,
            "base",
            &files.cert,
            &files.key,
            None,
            "",
        ))
        .unwrap()
        .replace("[upstream]\n", "[upstream]\nurls = []\n"),
    );
    assert_refused(&typo, EXIT_CONFIG, &[&show(&typo), "urls"]);

    // And a missing config file.
    let nowhere = pki.dir.join("no-such-gateway.toml");
    assert_refused(
        &nowhere,
        EXIT_CONFIG,
        &[&show(&nowhere), "pass the right path with --config"],
    );
}

#[test]
fn repo_gateway_toml_passes_check() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let scratch = common::scratch_dir("sv-repo");
    let run = run_in(&scratch, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert!(run.output.contains("verdict:   OK"), "{}", run.output);
    assert!(run.output.contains("result: OK"), "{}", run.output);
}

#[test]
fn a_port_in_use_is_named_once_with_the_likely_cause() {
    let pki = Pki::new("sv-port-in-use");
    let (_, files) = pki.localhost("site");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = write_config(&pki.dir, "c1", &files.cert, &files.key, None, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "https = \"127.0.0.1:0\"",
        &format!("https = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&config, text).unwrap();

    let run = run_in(&pki.dir, &["--config", config.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.output);
    assert!(
        run.output.contains(&format!(
            "listen.https = \"127.0.0.1:{port}\": cannot listen"
        )),
        "{}",
        run.output
    );
    assert!(
        run.output
            .contains("is another process (nginx?) using the port"),
        "{}",
        run.output
    );
    // The OS error once per line (the log line and the message on stderr), not repeated
    // as a "caused by" chain.
    for line in run.output.lines() {
        assert!(
            line.matches("Address already in use").count() <= 1,
            "{line}"
        );
    }
}

// Doctor diagnoses that used to mislead (compared with `nginx -t` on the same files). ----

#[test]
fn end_line_glued_to_the_next_begin_line_is_named_with_its_line() {
    let pki = Pki::new("sv-glued");
    let (leaf, files) = pki.localhost("site");
    // `cat leaf.crt intermediate.crt` where leaf.crt has no final newline.
    let glued = format!("{}{}", leaf.cert_pem.trim_end(), pki.intermediate_pem());
    let cert = write(&pki.dir, "glued.crt", glued);
    let config = write_config(&pki.dir, "glued", &cert, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!("certificate file {}, line", show(&cert)),
            "-----END CERTIFICATE----------BEGIN CERTIFICATE-----",
            "put a line break between",
        ],
    );
}

#[test]
fn pkcs12_bundle_gets_the_two_openssl_pkcs12_commands() {
    let pki = Pki::new("sv-pkcs12");
    let (_, files) = pki.localhost("site");
    let pfx = pki.dir.join("site.pfx");
    openssl(&[
        "pkcs12",
        "-export",
        "-passout",
        "pass:",
        "-in",
        &show(&files.cert),
        "-inkey",
        &show(&files.key),
        "-out",
        pfx.to_str().unwrap(),
    ]);
    let config = write_config(&pki.dir, "pfx", &pfx, &files.key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            "a PKCS#12 bundle",
            &format!("openssl pkcs12 -in {} -nokeys", show(&pfx)),
            &format!("openssl pkcs12 -in {} -nocerts -nodes", show(&pfx)),
        ],
    );
}

#[test]
fn rsa_1024_key_is_called_too_small() {
    let pki = Pki::new("sv-rsa1024");
    let key = pki.dir.join("small.key");
    let cert = pki.dir.join("small.crt");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:1024",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-days",
        "2",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    let config = write_config(&pki.dir, "small", &cert, &key, None, "");
    assert_refused(
        &config,
        EXIT_CERTIFICATE,
        &[
            &format!(
                "private key file {}: the RSA key has 1024 bits, too small",
                show(&key)
            ),
            "openssl genrsa",
        ],
    );
}

#[tokio::test]
async fn run_warns_about_what_check_warns_about() {
    let pki = Pki::new("sv-run-warnings");
    let (_, files) = pki.localhost("site");
    let extra = "\n[[static]]\nprefix = \"/static/\"\ndir = \"collected-static\"\n\n\
                 [redirect]\nacme_challenge_dir = \"acme-webroot\"\n";
    let config = pki.dir.join("warn.toml");
    std::fs::write(
        &config,
        format!(
            "{}{extra}",
            common::base_config(&files, "127.0.0.1:9".parse().unwrap())
        ),
    )
    .unwrap();
    let check = run_in(&pki.dir, &["check", "--config", config.to_str().unwrap()]);
    let mut gateway = common::spawn_binary(&config).await;
    for needle in [
        "static /static/: directory",
        "redirect.acme_challenge_dir: directory",
    ] {
        assert!(check.output.contains(needle), "check: {}", check.output);
        assert!(
            gateway.output().contains(needle),
            "run: {}",
            gateway.output()
        );
    }
    gateway.signal("TERM");
    gateway.wait_exit(Duration::from_secs(20)).await;
}

/// JSON log fields are numbers, durations with at most microsecond precision.
#[tokio::test]
async fn json_log_numbers_are_numbers_with_fixed_precision() {
    let pki = Pki::new("sv-json-log");
    let (_, files) = pki.localhost("site");
    let upstream = common::Upstream::start().await;
    let config = pki.dir.join("json.toml");
    let text = common::base_config(&files, upstream.addr).replace(
        "[log]\naccess_log = false",
        "[log]\naccess_log = true\nformat = \"json\"",
    );
    std::fs::write(&config, text).unwrap();
    let mut gateway = common::spawn_binary(&config).await;
    let https = gateway.https;
    let client = common::https_client(&pki.root_pem(), common::Http::One, https);
    for _ in 0..20 {
        let url = format!("https://localhost:{}/sleep/1", https.port());
        assert_eq!(client.get(url).send().await.unwrap().status(), 200);
    }
    gateway
        .wait_for_lines("\"status\":200", 20, Duration::from_secs(20))
        .await;
    gateway.signal("TERM");
    gateway.wait_exit(Duration::from_secs(20)).await;
    let mut access_lines = 0;
    for line in gateway.output().lines().filter(|l| l.starts_with('{')) {
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(ms) = json.get("ms") {
            access_lines += 1;
            for field in [ms, &json["upstream_ms"]] {
                let text = field.to_string();
                let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
                assert!(field.is_number() && decimals <= 3, "{field} in {line}");
            }
        }
        if let Some(grace) = json.get("grace_ms") {
            assert!(grace.is_u64(), "grace_ms must be a number: {line}");
        }
    }
    assert_eq!(access_lines, 20);
}

/// `certs/generate-dev-certs.sh NAMES...` keeps a local dev CA and issues certificates
/// for any names that `check` accepts for those names.
#[test]
fn dev_certificate_script_issues_for_any_names_from_a_kept_local_ca() {
    let dir = common::scratch_dir("sv-dev-ca");
    let script = dir.join("generate-dev-certs.sh");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/generate-dev-certs.sh"),
        &script,
    )
    .unwrap();
    let issue = |names: &[&str]| {
        let out = Command::new("bash")
            .arg(&script)
            .args(names)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    issue(&["example.com", "www.example.com"]);
    let root = std::fs::read(dir.join("local-ca/root.crt")).unwrap();
    issue(&["api.example.com"]);
    assert_eq!(
        std::fs::read(dir.join("local-ca/root.crt")).unwrap(),
        root,
        "the CA is kept"
    );
    for (name, names) in [
        ("example.com", "[\"example.com\", \"www.example.com\"]"),
        ("api.example.com", "[\"api.example.com\"]"),
    ] {
        let cert = dir.join(format!("local/{name}.crt"));
        let key = dir.join(format!("local/{name}.key"));
        let bundle = dir.join("bundle.crt");
        std::fs::write(&bundle, &root).unwrap();
        let config = write_config(
            &dir,
            name,
            &cert,
            &key,
            Some(&bundle),
            &format!("names = {names}"),
        );
        let run = run_in(&dir, &["check", "--config", config.to_str().unwrap()]);
        assert_eq!(run.code, Some(0), "{}", run.output);
    }
}
