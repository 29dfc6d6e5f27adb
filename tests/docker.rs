//! The Docker deployment, checked without a Docker engine (none runs on the build
//! machines): the Dockerfile and `.dockerignore` (multi-stage, `--locked`, non-root,
//! HEALTHCHECK through `gatehouse health`, the build context still loads as a locked
//! workspace), `examples/docker-compose.yml` (parsed; ports, mounts, networks, secrets
//! and the mounted config agree with each other), the mounted config passing
//! `gatehouse check`, and the binary serving with that config as an unprivileged user
//! (`setpriv`, like the image's `USER nonroot`) against a Redis with the compose file's
//! ACL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{free_port, scrape, scratch_dir, tls_client_config, Pki, RedisServer, Upstream};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------

/// One Dockerfile instruction, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    /// 0 for the first `FROM` stage, 1 for the second, …
    stage: usize,
    keyword: String,
    args: String,
}

/// Parses a Dockerfile: comments and blank lines skipped, `\` continuations joined,
/// every keyword known, nothing before the first `FROM` but `ARG`.
fn parse_dockerfile(text: &str) -> Vec<Instruction> {
    const KEYWORDS: [&str; 18] = [
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
        "MAINTAINER",
    ];
    let mut instructions = Vec::new();
    let mut stage: Option<usize> = None;
    let mut pending = String::new();
    // ARGs before the first FROM, whose defaults FROM lines may name as `${NAME}`.
    let mut global_args: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(start) = trimmed.strip_suffix('\\') {
            pending.push_str(start.trim());
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let full = std::mem::take(&mut pending);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let keyword = keyword.to_ascii_uppercase();
        assert!(
            KEYWORDS.contains(&keyword.as_str()),
            "unknown instruction {keyword}"
        );
        let mut args = args.trim().to_owned();
        if keyword == "FROM" {
            stage = Some(stage.map_or(0, |s| s + 1));
            for (name, default) in &global_args {
                args = args.replace(&format!("${{{name}}}"), default);
            }
        }
        if keyword == "ARG" && stage.is_none() {
            if let Some((name, default)) = args.split_once('=') {
                global_args.push((name.to_owned(), default.to_owned()));
            }
        }
        let stage = match stage {
            Some(stage) => stage,
            None if keyword == "ARG" => 0,
            None => panic!("{keyword} before the first FROM"),
        };
        instructions.push(Instruction {
            stage,
            keyword,
            args,
        });
    }
    assert!(pending.is_empty(), "dangling continuation: {pending}");
    instructions
}

/// `["a", "b"]` (exec form) into its strings.
fn exec_form(args: &str) -> Vec<String> {
    let inner = args
        .trim()
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not exec form: {args}"));
    inner
        .split(',')
        .map(|part| {
            let part = part.trim();
            part.strip_prefix('"')
                .and_then(|p| p.strip_suffix('"'))
                .unwrap_or_else(|| panic!("not a quoted string: {part}"))
                .to_owned()
        })
        .collect()
}

#[test]
fn dockerfile_is_multi_stage_locked_non_root_with_gatehouse_health() {
    let text = read("Dockerfile");
    // Offline and classic-builder builds: no frontend to pull, no BuildKit-only flags.
    assert!(
        !text.lines().any(|l| l.starts_with("# syntax=")),
        "a syntax line pulls a frontend image"
    );
    assert!(
        !text
            .lines()
            .any(|l| !l.starts_with('#') && l.contains("--mount=")),
        "RUN --mount needs BuildKit"
    );
    let instructions = parse_dockerfile(&text);
    let in_stage_args = |keyword: &str| {
        instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .map(|i| i.args.clone())
            .collect::<Vec<_>>()
    };
    assert!(
        in_stage_args("ARG")
            .iter()
            .any(|a| a.starts_with("RUST_IMAGE="))
            && in_stage_args("ARG")
                .iter()
                .any(|a| a.starts_with("RUNTIME_IMAGE=")),
        "base images are build arguments"
    );
    let last_stage = instructions.last().unwrap().stage;
    assert!(last_stage >= 1, "multi-stage: build and runtime");
    let in_stage = |stage: usize, keyword: &str| -> Vec<&Instruction> {
        instructions
            .iter()
            .filter(|i| i.stage == stage && i.keyword == keyword)
            .collect()
    };

    // Build stage: the Rust image, cargo build --release --locked.
    let from = &in_stage(0, "FROM")[0].args;
    assert!(from.starts_with("rust:"), "{from}");
    let build_name = from.split_whitespace().last().unwrap();
    assert!(
        from.to_ascii_uppercase().contains(" AS "),
        "named stage: {from}"
    );
    assert!(
        in_stage(0, "RUN")
            .iter()
            .any(|run| run.args.contains("cargo build --release --locked")),
        "the build must use Cargo.lock as committed"
    );

    // Runtime stage: copies only the binary from the build stage, and the empty ACME
    // storage directory owned by nonroot (a named volume takes its owner).
    let runtime_from = &in_stage(last_stage, "FROM")[0].args;
    assert!(
        runtime_from.contains("distroless") || runtime_from.contains("slim"),
        "small runtime image: {runtime_from}"
    );
    let copies = in_stage(last_stage, "COPY");
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert!(copies
        .iter()
        .all(|copy| copy.args.starts_with(&format!("--from={build_name} "))));
    let binary = copies[0].args.split_whitespace().last().unwrap().to_owned();
    assert_eq!(
        copies[1].args,
        format!("--from={build_name} --chown=65532:65532 /var/lib/gatehouse /var/lib/gatehouse")
    );
    assert_eq!(
        gatehouse::config::acme::DEFAULT_ACME_STORAGE,
        "/var/lib/gatehouse/acme"
    );

    // Non-root: the last USER of the runtime stage.
    let user = &in_stage(last_stage, "USER").last().expect("USER").args;
    let name = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&name), "runs as {user}");

    // Ports: 8080 (HTTP) and 8443 (HTTPS), unprivileged.
    let exposed: BTreeSet<String> = in_stage(last_stage, "EXPOSE")
        .iter()
        .flat_map(|e| e.args.split_whitespace().map(str::to_owned))
        .collect();
    assert_eq!(exposed, BTreeSet::from(["8080".into(), "8443".into()]));

    // HEALTHCHECK runs the binary itself (no curl in distroless).
    let healthcheck = &in_stage(last_stage, "HEALTHCHECK")[0].args;
    let cmd = healthcheck
        .split_once("CMD ")
        .unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {healthcheck}"))
        .1;
    assert_eq!(
        exec_form(cmd),
        [
            binary.as_str(),
            "health",
            "--config",
            "/etc/gatehouse/gateway.toml"
        ]
    );
    assert_eq!(in_stage(last_stage, "STOPSIGNAL")[0].args, "SIGTERM");
    let entrypoint = exec_form(&in_stage(last_stage, "ENTRYPOINT")[0].args);
    assert_eq!(entrypoint, [binary.as_str()]);
    let cmd = exec_form(&in_stage(last_stage, "CMD")[0].args);
    assert_eq!(cmd, ["run", "--config", "/etc/gatehouse/gateway.toml"]);

    // The default shutdown grace drains before Docker's 10 s SIGKILL.
    let config = gatehouse::Config::load(&repo().join("gateway.toml")).unwrap();
    assert!(config.server.shutdown_grace < Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// .dockerignore and the build context
// ---------------------------------------------------------------------------------------

/// Whether `pattern` (Docker's .dockerignore syntax: `*` within a component, `**` any
/// number of components, a trailing `/` ignored) matches `path` or one of its parents.
fn ignored(patterns: &[String], path: &str) -> bool {
    fn matches(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.first(), path.first()) {
            (None, None) => true,
            (Some(&"**"), _) => {
                matches(&pattern[1..], path) || (!path.is_empty() && matches(pattern, &path[1..]))
            }
            (Some(p), Some(c)) => component(p, c) && matches(&pattern[1..], &path[1..]),
            _ => false,
        }
    }
    fn component(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((before, after)) => {
                name.len() >= before.len() + after.len()
                    && name.starts_with(before)
                    && name.ends_with(after)
            }
        }
    }
    let components: Vec<&str> = path.split('/').collect();
    let mut excluded = false;
    for pattern in patterns {
        let (negate, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let parts: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
        // A pattern matching a parent directory excludes everything under it.
        if (1..=components.len()).any(|n| matches(&parts, &components[..n])) {
            excluded = !negate;
        }
    }
    excluded
}

/// Copies what `docker build .` would send (the repo minus `.dockerignore`) to `to`;
/// returns the copied paths.
fn copy_build_context(to: &Path) -> Vec<String> {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let mut copied = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        for entry in std::fs::read_dir(repo().join(&relative)).unwrap() {
            let entry = entry.unwrap();
            let path = relative.join(entry.file_name());
            let text = path.to_str().unwrap().to_owned();
            if ignored(&patterns, &text) {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                std::fs::create_dir_all(to.join(&path)).unwrap();
                stack.push(path);
            } else if kind.is_file() {
                std::fs::copy(entry.path(), to.join(&path)).unwrap();
                copied.push(text);
            }
        }
    }
    copied
}

#[test]
fn dockerignore_keeps_secrets_and_target_out_and_the_locked_workspace_in() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for path in [
        "target/debug/gatehouse",
        ".git/config",
        "certs/localhost.key",
        "tests/some/where/site.key",
        "privkey.pem",
    ] {
        assert!(
            ignored(&patterns, path),
            "{path} must stay out of the image"
        );
    }
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/tls/certs.rs",
        "loadtest/origin/Cargo.toml",
    ] {
        assert!(!ignored(&patterns, path), "{path} is needed to build");
    }

    let context = scratch_dir("docker-context");
    let copied = copy_build_context(&context);
    assert!(copied.iter().any(|p| p == "Cargo.lock"));
    assert!(
        !copied.iter().any(|p| {
            let extension = Path::new(p).extension().and_then(|e| e.to_str());
            extension
                .is_some_and(|e| e.eq_ignore_ascii_case("key") || e.eq_ignore_ascii_case("pem"))
        }),
        "private keys in the build context: {copied:?}"
    );
    // `cargo build --locked` in the image starts by resolving the workspace against
    // Cargo.lock: do exactly that on the copied context (offline, no compiling).
    // Only the host platform's packages (those `cargo test` already downloaded), offline
    // first; online when the local cache lacks one (a fresh machine).
    let host = String::from_utf8(Command::new("rustc").arg("-vV").output().unwrap().stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap()
        .to_owned();
    let metadata = |offline: bool| {
        let mut command = Command::new(env!("CARGO"));
        command
            .args(["metadata", "--locked", "--format-version", "1"])
            .args(["--filter-platform", &host])
            .current_dir(&context);
        if offline {
            command.arg("--offline");
        }
        command.output().unwrap()
    };
    let mut output = metadata(true);
    if !output.status.success() && String::from_utf8_lossy(&output.stderr).contains("offline") {
        output = metadata(false);
    }
    assert!(
        output.status.success(),
        "the build context does not load as a locked workspace:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let has_binary = metadata["packages"].as_array().unwrap().iter().any(|p| {
        p["name"] == "gatehouse"
            && p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "gatehouse" && t["kind"][0] == "bin")
    });
    assert!(has_binary, "`--bin gatehouse` must exist in the context");
    let _ = std::fs::remove_dir_all(&context);
}

// ---------------------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------------------

/// The YAML subset compose files are written in: block mappings and sequences, plain or
/// quoted scalars, flow sequences of scalars, `{}`. Anything else (tabs, anchors,
/// multi-line strings) fails the parse, so the file stays simple to read.
#[derive(Debug, Clone, PartialEq)]
enum Yaml {
    Map(BTreeMap<String, Yaml>),
    List(Vec<Yaml>),
    Str(String),
}

impl Yaml {
    fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(map) => map.get(key),
            _ => None,
        }
    }

    fn at(&self, path: &str) -> &Yaml {
        path.split('.')
            .try_fold(self, |node, key| node.get(key))
            .unwrap_or_else(|| panic!("no {path} in the compose file"))
    }

    fn str(&self) -> &str {
        match self {
            Yaml::Str(s) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    fn strings(&self) -> Vec<String> {
        match self {
            Yaml::List(items) => items.iter().map(|i| i.str().to_owned()).collect(),
            other => panic!("not a list: {other:?}"),
        }
    }

    fn keys(&self) -> BTreeSet<String> {
        match self {
            Yaml::Map(map) => map.keys().cloned().collect(),
            other => panic!("not a map: {other:?}"),
        }
    }
}

fn parse_yaml(text: &str) -> Yaml {
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (number, raw) in text.lines().enumerate() {
        assert!(!raw.contains('\t'), "line {}: tab", number + 1);
        let content = strip_comment(raw);
        if content.trim().is_empty() {
            continue;
        }
        let indent = content.len() - content.trim_start().len();
        lines.push((indent, content.trim().to_owned()));
    }
    let mut at = 0;
    let root = parse_block(&mut lines, &mut at, 0);
    assert_eq!(at, lines.len(), "unparsed line: {:?}", lines.get(at));
    root
}

/// The line without a `#` comment (a `#` at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous == ' ' => return line[..i].trim_end(),
            _ => {}
        }
        previous = c;
    }
    line.trim_end()
}

fn parse_block(lines: &mut Vec<(usize, String)>, at: &mut usize, indent: usize) -> Yaml {
    let is_item = |text: &str| text == "-" || text.starts_with("- ");
    if is_item(&lines[*at].1) {
        let mut items = Vec::new();
        while *at < lines.len() && lines[*at].0 == indent && is_item(&lines[*at].1) {
            let rest = lines[*at].1[1..].trim().to_owned();
            if rest.is_empty() {
                *at += 1;
                let child = lines[*at].0;
                assert!(child > indent);
                items.push(parse_block(lines, at, child));
            } else if split_key(&rest).is_some() {
                // `- key: value` starts a mapping indented past the dash.
                lines[*at] = (indent + 2, rest);
                items.push(parse_block(lines, at, indent + 2));
            } else {
                items.push(scalar(&rest));
                *at += 1;
            }
        }
        return Yaml::List(items);
    }
    let mut map = BTreeMap::new();
    while *at < lines.len() && lines[*at].0 == indent {
        let (key, value) = split_key(&lines[*at].1)
            .unwrap_or_else(|| panic!("not `key: value`: {:?}", lines[*at]));
        *at += 1;
        let node = if value.is_empty() {
            let child = lines.get(*at).map_or(0, |l| l.0);
            let nested = *at < lines.len()
                && (child > indent || (child == indent && is_item(&lines[*at].1)));
            if nested {
                parse_block(lines, at, child)
            } else {
                Yaml::Str(String::new())
            }
        } else {
            scalar(&value)
        };
        assert!(
            map.insert(key.clone(), node).is_none(),
            "duplicate key {key}"
        );
    }
    assert!(
        *at == lines.len() || lines[*at].0 < indent,
        "bad indentation: {:?}",
        lines[*at]
    );
    Yaml::Map(map)
}

/// `key: value` (or `key:`), key plain or quoted.
fn split_key(text: &str) -> Option<(String, String)> {
    let (key, value) = if let Some(quoted) = text.strip_prefix('"') {
        let end = quoted.find('"')?;
        let rest = quoted[end + 1..].strip_prefix(':')?;
        (quoted[..end].to_owned(), rest)
    } else {
        let colon = text
            .find(": ")
            .or_else(|| text.strip_suffix(':').map(str::len))?;
        let key = &text[..colon];
        if key.contains(['[', '{', '"', ' ']) {
            return None;
        }
        (key.to_owned(), &text[colon + 1..])
    };
    Some((key, value.trim().to_owned()))
}

fn scalar(text: &str) -> Yaml {
    assert!(
        !text.starts_with(['&', '*', '|', '>', '!']),
        "unsupported YAML: {text}"
    );
    if text == "{}" {
        return Yaml::Map(BTreeMap::new());
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return Yaml::List(
            inner
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(scalar)
                .collect(),
        );
    }
    for q in ['"', '\''] {
        if let Some(inner) = text.strip_prefix(q).and_then(|t| t.strip_suffix(q)) {
            return Yaml::Str(inner.to_owned());
        }
    }
    Yaml::Str(text.to_owned())
}

#[test]
fn yaml_subset_parser_reads_what_compose_files_use() {
    let doc = parse_yaml(
        "a:\n  b: \"x # y\"  # comment\n  c: [1, \"2\"]\n  d:\n    - p: 1\n      q: 2\n    - plain\n  e: {}\nf:\n- g\n",
    );
    assert_eq!(doc.at("a.b").str(), "x # y");
    assert_eq!(doc.at("a.c").strings(), ["1", "2"]);
    let Yaml::List(items) = doc.at("a.d") else {
        panic!()
    };
    assert_eq!(items[0].at("q").str(), "2");
    assert_eq!(items[1].str(), "plain");
    assert_eq!(doc.at("a.e"), &Yaml::Map(BTreeMap::new()));
    assert_eq!(doc.at("f").strings(), ["g"]);
    assert_eq!(with_defaults("${A:-80}:8080"), "80:8080");
    assert_eq!(
        with_defaults("${A:-127.0.0.1:80}:${B:-8080}"),
        "127.0.0.1:80:8080"
    );
    assert!(std::panic::catch_unwind(|| parse_yaml("a:\n\tb: 1\n")).is_err());
    assert!(std::panic::catch_unwind(|| parse_yaml("a: &x 1\n")).is_err());
}

/// `SRC:DST[:MODE]` of a compose volume entry.
fn mount(entry: &str) -> (String, String, String) {
    // `${VAR:-default}` sources contain a colon of their own.
    let (source, rest) = if entry.starts_with("${") {
        let end = entry.find('}').unwrap() + 1;
        (&entry[..end], entry[end + 1..].to_owned())
    } else {
        let (s, r) = entry.split_once(':').unwrap();
        (s, r.to_owned())
    };
    let (target, mode) = rest.split_once(':').unwrap_or((&rest, "rw"));
    (source.to_owned(), target.to_owned(), mode.to_owned())
}

/// What compose makes of `${VAR:-default}` with VAR unset: the default.
fn with_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').unwrap();
        let (_, default) = rest[start + 2..end]
            .split_once(":-")
            .unwrap_or_else(|| panic!("{text}: a variable without a default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn docker_config() -> toml::Table {
    read("examples/gateway.docker.toml").parse().unwrap()
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap()
}

#[test]
fn compose_file_parses_and_agrees_with_the_dockerfile_and_the_mounted_config() {
    let compose = parse_yaml(&read("examples/docker-compose.yml"));
    let examples = repo().join("examples");
    let services = compose.at("services");
    assert_eq!(
        services.keys(),
        BTreeSet::from([
            "channels".into(),
            "gatehouse".into(),
            "redis".into(),
            "web".into()
        ])
    );
    let config = docker_config();
    let gatehouse = services.at("gatehouse");

    // The image is built from this repo's Dockerfile.
    let context = examples.join(gatehouse.at("build.context").str());
    assert!(context
        .join(gatehouse.at("build.dockerfile").str())
        .is_file());
    assert_eq!(
        context.canonicalize().unwrap(),
        repo().canonicalize().unwrap()
    );

    // Every relative path the compose file names exists in the repo, or is one of the
    // secrets ./make-secrets.sh creates (checked in the next test).
    for service in services.keys() {
        let Some(volumes) = services.at(&service).get("volumes") else {
            continue;
        };
        for entry in volumes.strings() {
            let (source, _, _) = mount(&entry);
            if source.starts_with('.') {
                assert!(examples.join(&source).exists(), "{service}: {source}");
            }
        }
    }

    // Ports: the host's 80/443 to the EXPOSEd 8080/8443 the config listens on.
    // (The host side can be moved, e.g. to loopback by examples/docker-smoke.sh.)
    let ports: Vec<String> = gatehouse
        .at("ports")
        .strings()
        .iter()
        .map(|p| with_defaults(p))
        .collect();
    assert_eq!(ports, ["80:8080", "443:8443"]);
    assert_eq!(config["listen"]["http"].as_str(), Some("0.0.0.0:8080"));
    assert_eq!(config["listen"]["https"].as_str(), Some("0.0.0.0:8443"));
    assert_eq!(
        config["listen"]["public_https_port"].as_integer(),
        Some(443)
    );

    // Mounts: config and certificates read-only where the image and config expect them.
    let mounts: Vec<(String, String, String)> = gatehouse
        .at("volumes")
        .strings()
        .iter()
        .map(|e| mount(e))
        .collect();
    for (source, target, mode) in &mounts {
        assert_eq!(mode, "ro", "gatehouse mounts {source} at {target} writable");
    }
    let target_of = |source: &str| -> String {
        mounts
            .iter()
            .find(|(s, _, _)| s == source)
            .unwrap_or_else(|| panic!("no mount of {source}"))
            .1
            .clone()
    };
    assert_eq!(
        target_of("./gateway.docker.toml"),
        "/etc/gatehouse/gateway.toml"
    );
    let cert_mount = mounts
        .iter()
        .find(|(_, t, _)| t == "/etc/gatehouse/certs")
        .expect("certificate directory mount");
    assert!(
        cert_mount.0.starts_with("${") || cert_mount.0.starts_with('/'),
        "certificates come from a host directory: {}",
        cert_mount.0
    );
    for key in ["cert", "key"] {
        let path = config["tls"][key].as_str().unwrap();
        assert!(
            Path::new("/etc/gatehouse")
                .join(path)
                .starts_with(&cert_mount.1),
            "tls.{key} = {path} is not under the certificate mount"
        );
    }
    // Static and media: the app's named volumes, read-only in the gateway, at the
    // config's [[static]] dirs.
    let statics = config["static"].as_array().unwrap();
    let web = services.at("web");
    let web_mounts: Vec<(String, String, String)> = web
        .at("volumes")
        .strings()
        .iter()
        .map(|e| mount(e))
        .collect();
    for entry in statics {
        let dir = entry["dir"].as_str().unwrap();
        let (volume, _, _) = mounts
            .iter()
            .find(|(_, t, _)| t == dir)
            .unwrap_or_else(|| panic!("[[static]] dir {dir} is not mounted"));
        assert!(compose.at("volumes").get(volume).is_some(), "{volume}");
        assert!(
            web_mounts.iter().any(|(s, _, m)| s == volume && m == "rw"),
            "the app writes {volume}"
        );
    }
    // certbot --webroot -w WEBROOT writes WEBROOT/.well-known/acme-challenge/TOKEN.
    let acme = config["redirect"]["acme_challenge_dir"].as_str().unwrap();
    let webroot = acme
        .strip_suffix("/.well-known/acme-challenge")
        .expect("acme_challenge_dir is the webroot's .well-known/acme-challenge");
    assert!(mounts.iter().any(|(_, t, _)| t == webroot));

    // The Channels layout: HTTP to the web service (Gunicorn on TCP), /ws/ to the channels
    // service (Daphne on a Unix socket in a volume both containers mount).
    let upstream = config["upstream"]["url"].as_str().unwrap();
    assert_eq!(upstream, "http://web:8000");
    assert_eq!(web.at("expose").strings(), ["8000"]);
    let command = web.at("command").strings().join(" ");
    assert!(
        command.contains("gunicorn") && command.contains("8000"),
        "{command}"
    );
    let socket = config["upstreams"]["channels"]["url"]
        .as_str()
        .unwrap()
        .strip_prefix("unix:")
        .expect("the channels group is a Unix socket");
    let routes = config["route"].as_array().unwrap();
    assert!(routes
        .iter()
        .any(|route| route["prefix"].as_str() == Some("/ws/")
            && route["upstream"].as_str() == Some("channels")));
    let channels = services.at("channels");
    let command = channels.at("command").strings().join(" ");
    assert!(
        command.contains(&format!("daphne -u {socket}")),
        "{command}"
    );
    let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    let (volume, _, _) = mounts
        .iter()
        .find(|(_, target, _)| target == socket_dir)
        .unwrap_or_else(|| panic!("gatehouse does not mount {socket_dir}"));
    assert!(compose.at("volumes").get(volume).is_some(), "{volume}");
    assert!(channels
        .at("volumes")
        .strings()
        .iter()
        .any(|entry| mount(entry).0 == *volume && mount(entry).1 == socket_dir));

    // Networks: only the gateway publishes ports; Redis and the app sit on an internal
    // network; Redis has no ports at all.
    assert_eq!(compose.at("networks.backend.internal").str(), "true");
    for service in ["web", "channels", "redis"] {
        let node = services.at(service);
        assert!(node.get("ports").is_none(), "{service} publishes ports");
        assert_eq!(node.at("networks").strings(), ["backend"]);
    }
    assert_eq!(gatehouse.at("networks").strings(), ["frontend", "backend"]);

    // Redis: ACL file from a secret; gatehouse gets its password as a secret, at the
    // config's password_file; [redis] url names the compose service.
    let redis = services.at("redis");
    let redis_command = redis.at("command").strings();
    let acl = redis_command
        .iter()
        .position(|a| a == "--aclfile")
        .map(|i| redis_command[i + 1].clone())
        .expect("redis-server --aclfile");
    let acl_secret = acl.strip_prefix("/run/secrets/").unwrap();
    assert_eq!(redis.at("secrets").strings(), [acl_secret]);
    let redis_section = &config["redis"];
    assert_eq!(
        redis_section["url"].as_str(),
        Some("redis://gatehouse@redis:6379/0")
    );
    let password_file = redis_section["password_file"].as_str().unwrap();
    let secret = password_file.strip_prefix("/run/secrets/").unwrap();
    assert_eq!(gatehouse.at("secrets").strings(), [secret]);
    for name in compose.at("secrets").keys() {
        let file = compose.at(&format!("secrets.{name}.file")).str();
        assert!(file.starts_with("./secrets/"), "{name}: {file}");
    }

    // Stopping: SIGTERM, and the config's grace ends before Docker's SIGKILL.
    assert_eq!(gatehouse.at("stop_signal").str(), "SIGTERM");
    let stop = duration(gatehouse.at("stop_grace_period").str());
    let grace = duration(config["server"]["shutdown_grace"].as_str().unwrap());
    assert!(grace + Duration::from_secs(1) < stop + Duration::from_millis(1));
    assert!(grace < Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// The mounted config, for real
// ---------------------------------------------------------------------------------------

/// A container-like tree in a temporary directory: the binary at
/// `usr/local/bin/gatehouse` (as in the image), `etc/gatehouse/gateway.toml` (the
/// example config with `/srv/` and `/run/secrets/` moved under the tree), certificates
/// for the config's names in `etc/gatehouse/certs/`, the secrets from
/// `examples/make-secrets.sh`, and the static directories. It lives under the system
/// temp dir, not `target/`, so an unprivileged user can reach it even when the checkout
/// sits in a private home directory; removed on drop.
struct Container {
    root: PathBuf,
    config: PathBuf,
    binary: PathBuf,
    pki: Pki,
    /// Stands for Daphne: a socket listening where the channels group points.
    _daphne: std::os::unix::net::UnixListener,
    _dir: tempfile::TempDir,
}

fn container(name: &str, rewrite: impl Fn(String) -> String) -> Container {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new(name);
    let dir = tempfile::Builder::new()
        .prefix(&format!("gatehouse-{name}-"))
        .tempdir()
        .unwrap();
    let root = dir.path().to_owned();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = root.join("usr/local/bin/gatehouse");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    std::fs::copy(common::binary(), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let etc = root.join("etc/gatehouse");
    std::fs::create_dir_all(etc.join("certs")).unwrap();
    let leaf = pki.leaf(&["example.com", "www.example.com"]);
    std::fs::write(
        etc.join("certs/fullchain.pem"),
        format!("{}{}", leaf.cert_pem, pki.intermediate_pem()),
    )
    .unwrap();
    std::fs::write(etc.join("certs/privkey.pem"), &leaf.key_pem).unwrap();
    for dir in ["srv/static", "srv/media", "srv/acme"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("srv/static/hello.txt"), "static hello\n").unwrap();
    // What `certbot certonly --webroot -w /var/www/acme` leaves in the mounted webroot.
    std::fs::create_dir_all(root.join("srv/acme/.well-known/acme-challenge")).unwrap();
    std::fs::write(
        root.join("srv/acme/.well-known/acme-challenge/tok3n"),
        "tok3n.thumbprint",
    )
    .unwrap();

    let secrets = root.join("run/secrets");
    std::fs::create_dir_all(root.join("run")).unwrap();
    let output = Command::new("sh")
        .arg(repo().join("examples/make-secrets.sh"))
        .arg(&secrets)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "make-secrets.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every secret the compose file names is created by the script.
    let compose = parse_yaml(&read("examples/docker-compose.yml"));
    for name in compose.at("secrets").keys() {
        let file = compose.at(&format!("secrets.{name}.file")).str();
        let created = secrets.join(file.strip_prefix("./secrets/").unwrap());
        assert!(created.is_file(), "make-secrets.sh did not create {file}");
    }
    // Compose bind-mounts each secret file on its own; here the directory is shared, so
    // open it for the unprivileged run (the script keeps it 0700 on the host).
    Command::new("chmod")
        .arg("0755")
        .arg(&secrets)
        .status()
        .unwrap();

    std::fs::create_dir_all(root.join("run/daphne")).unwrap();
    let daphne =
        std::os::unix::net::UnixListener::bind(root.join("run/daphne/daphne.sock")).unwrap();
    let text = read("examples/gateway.docker.toml")
        .replace("\"/srv/", &format!("\"{}/srv/", root.display()))
        .replace("\"unix:/run/", &format!("\"unix:{}/run/", root.display()))
        .replace("\"/run/secrets/", &format!("\"{}/", secrets.display()));
    let config = etc.join("gateway.toml");
    std::fs::write(&config, rewrite(text)).unwrap();
    Container {
        root,
        config,
        binary,
        pki,
        _daphne: daphne,
        _dir: dir,
    }
}

#[test]
fn the_mounted_config_passes_gatehouse_check() {
    let container = container("docker-check", |text| text);
    let config = container.config.to_str().unwrap();
    let output = Command::new(&container.binary)
        .args(["check", "--config", config])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("result: OK"), "{stdout}");
    assert!(
        stdout.contains("names:     example.com, www.example.com"),
        "{stdout}"
    );
    // The Django hint for this deployment: public port 443, so no port in the origins.
    assert!(
        stdout.contains(
            "CSRF_TRUSTED_ORIGINS = [\"https://example.com\", \"https://www.example.com\"]"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("warning:"), "{stdout}");
}

// ---------------------------------------------------------------------------------------
// Unprivileged run
// ---------------------------------------------------------------------------------------

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// The effective uid of `pid`.
fn uid_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap()
        .to_owned()
}

/// Runs `setpriv --reuid=65534 --regid=65534 --clear-groups BINARY ARGS…`.
fn unprivileged(binary: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(binary)
        .args(args);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_mounted_config_as_an_unprivileged_user() {
    if !is_root() {
        eprintln!(
            "SKIPPED: dropping to uid 65534 with setpriv needs root; run the tests as root (CI does)"
        );
        return;
    }
    let upstream = Upstream::start().await;
    let (http, https, admin, redis_port) = (free_port(), free_port(), free_port(), free_port());
    let upstream_addr = upstream.addr;
    let container = container("docker-run", |text| {
        text.replace("0.0.0.0:8080", &format!("127.0.0.1:{http}"))
            .replace("0.0.0.0:8443", &format!("127.0.0.1:{https}"))
            .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin}"))
            .replace("http://web:8000", &format!("http://{upstream_addr}"))
            .replace("@redis:6379", &format!("@127.0.0.1:{redis_port}"))
    });
    // A Redis with the compose file's ACL (from make-secrets.sh).
    let acl = container.root.join("run/secrets/redis_users.acl");
    let redis = RedisServer::start_on(
        redis_port,
        container.root.clone(),
        &["--aclfile", acl.to_str().unwrap()],
    )
    .await;

    let config = container.config.to_str().unwrap().to_owned();
    let process =
        common::spawn_command(unprivileged(&container.binary, &["--config", &config])).await;
    assert_eq!(process.https, SocketAddr::from(([127, 0, 0, 1], https)));
    // setpriv execs gatehouse: the listening process itself runs as nobody.
    assert_eq!(uid_of(process.child.id()), "65534");
    // JSON log lines, as `docker logs` will show them.
    assert!(
        process
            .output()
            .lines()
            .any(|l| l.starts_with('{') && l.contains("\"gatehouse listening\"")),
        "{}",
        process.output()
    );

    let tls = (*tls_client_config(&container.pki.root_pem(), &[b"h2", b"http/1.1"])).clone();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .resolve("example.com", process.https)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let response = client
        .get(format!("https://example.com:{https}/app/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("strict-transport-security"));
    assert_eq!(response.text().await.unwrap(), "seen GET /app/ 0");
    let response = client
        .get(format!("https://example.com:{https}/static/hello.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "static hello\n");
    let redirect = common::plain_client()
        .get(format!("http://127.0.0.1:{http}/path?q=1"))
        .header("host", "example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 301);
    assert_eq!(
        redirect.headers()["location"],
        "https://example.com/path?q=1"
    );
    // The ACME HTTP-01 challenge is answered on the HTTP port from the mounted webroot.
    let challenge = common::plain_client()
        .get(format!(
            "http://127.0.0.1:{http}/.well-known/acme-challenge/tok3n"
        ))
        .header("host", "example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(challenge.status(), 200);
    assert_eq!(challenge.text().await.unwrap(), "tok3n.thumbprint");

    let healthz = common::plain_client()
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);

    // The rate limiter reaches Redis as the ACL user "gatehouse" with the secret's
    // password: /readyz says so, and the decisions were made by Redis.
    let (_, readyz) = common::readyz(([127, 0, 0, 1], admin).into()).await;
    assert_eq!(readyz["ready"], true, "{readyz}");
    assert_eq!(readyz["checks"]["redis"]["ok"], true, "{readyz}");
    let metrics = scrape(SocketAddr::from(([127, 0, 0, 1], admin))).await;
    assert!(
        metrics
            .count("gatehouse_rate_limit_decisions_total{backend=\"redis\",outcome=\"allowed\"}")
            > 0,
        "{metrics:?}"
    );
    assert!(
        !process.output().contains(
            &std::fs::read_to_string(container.root.join("run/secrets/gatehouse_redis_password"))
                .unwrap()
        ),
        "the Redis password was logged"
    );

    // The image's HEALTHCHECK, as the same unprivileged user.
    let health = unprivileged(&container.binary, &["health", "--config", &config])
        .output()
        .unwrap();
    assert_eq!(
        health.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    // SIGTERM (the image's STOPSIGNAL) stops it cleanly within the grace.
    let mut process = process;
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(9)).await, Some(0));
    drop(redis);
    upstream.stop().await;
}

#[test]
fn the_binary_needs_only_the_libraries_distroless_cc_ships() {
    // gcr.io/distroless/cc-debian12 has glibc (libc, libm, …) and libgcc_s, no OpenSSL
    // or libstdc++ guarantees: a new dependency linking anything else breaks the image.
    let Ok(output) = Command::new("ldd").arg(common::binary()).output() else {
        eprintln!("SKIPPED: no ldd on this machine");
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let glibc_or_libgcc = [
        "linux-vdso.so",
        "ld-linux",
        "libc.so",
        "libm.so",
        "libgcc_s.so",
        "libpthread.so",
        "libdl.so",
        "librt.so",
    ];
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        assert!(
            glibc_or_libgcc.iter().any(|lib| line.contains(lib)),
            "gatehouse links {line}, which the distroless/cc runtime image does not ship"
        );
    }
}

#[test]
fn compose_file_has_no_top_level_name_for_compose_1() {
    // Debian's docker-compose 1.x refuses a top-level `name:`.
    let text = read("examples/docker-compose.yml");
    assert!(
        !text.lines().any(|line| line.starts_with("name:")),
        "{text}"
    );
}
