//! A real Django app behind the gateway: with only `SECURE_PROXY_SSL_HEADER` set, Django
//! sees `request.is_secure()`, the client's Host and address, and its CSRF protection
//! accepts an HTTPS form post made through the gateway (its Origin check compares the
//! Origin header with the scheme Django believes in, so this fails without
//! X-Forwarded-Proto). Needs python3 with Django (`.ci/test` installs it).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::{base_config, https_client, start_gateway, CertFiles, Http, Pki};

struct Django(Child);

impl Drop for Django {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_django() -> (Django, SocketAddr) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/django/app.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the Django test");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| {
        panic!("Django did not start (is it installed? `pip install django`): {line:?}")
    });
    (Django(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

async fn gateway_for_django(
    pki: &Pki,
    files: &CertFiles,
    django: SocketAddr,
) -> common::TestGateway {
    start_gateway(&base_config(files, django), &pki.dir).await
}

#[tokio::test]
async fn django_sees_https_and_accepts_csrf_protected_posts() {
    let pki = Pki::new("django");
    let (_, files) = pki.localhost("site");
    let (_django, addr) = start_django();
    let gateway = gateway_for_django(&pki, &files, addr).await;
    let origin = format!("https://localhost:{}", gateway.https.port());

    for version in [Http::One, Http::Two] {
        let client = https_client(&pki.root_pem(), version, gateway.https);
        let form = client.get(gateway.url("/form/")).send().await.unwrap();
        assert_eq!(form.status(), 200);
        let cookie = form.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(cookie.contains("Secure"), "{cookie}");
        let cookie = cookie.split(';').next().unwrap().to_owned();
        let page: serde_json::Value = form.json().await.unwrap();
        assert_eq!(page["is_secure"], true, "{page}");
        assert_eq!(page["host"], format!("localhost:{}", gateway.https.port()));
        assert_eq!(page["absolute_uri"], format!("{origin}/form/"));
        assert_eq!(page["x_real_ip"], "127.0.0.1");
        let token = page["csrf_token"].as_str().unwrap();

        let submitted = client
            .post(gateway.url("/submit/"))
            .header("cookie", &cookie)
            .header("origin", &origin)
            .header("referer", format!("{origin}/form/"))
            .form(&[("csrfmiddlewaretoken", token), ("value", "42")])
            .send()
            .await
            .unwrap();
        assert_eq!(
            submitted.status(),
            200,
            "{}",
            submitted.text().await.unwrap()
        );
        let result: serde_json::Value = submitted.json().await.unwrap();
        assert_eq!(result["value"], "42");

        // Control: the same post with a foreign Origin is refused by Django, so the
        // acceptance above is Django's CSRF check passing, not a check switched off.
        let forged = client
            .post(gateway.url("/submit/"))
            .header("cookie", &cookie)
            .header("origin", "https://evil.example")
            .form(&[("csrfmiddlewaretoken", token), ("value", "1")])
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), 403);
    }
    gateway.stop().await;
}
