//! The `gatehouse` binary: `run` (default), `check`, `health`, `reload` and `renew`. Loads the config, sets up
//! logging and the runtime, and turns errors into messages and exit codes:
//! 0 success, 64 bad configuration, 65 bad certificate, 3 `check --probe` found a
//! problem in the app's settings, 1 anything else (including an app `--probe` cannot reach).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gatehouse::admin::{Readiness, ReloadReport};
use gatehouse::config::{Config, LogFormat};
use gatehouse::live::{LogLevelHook, ReloadHandle};
use gatehouse::probe::{ProbeOptions, Verdict};
use gatehouse::tls::acme::AttemptReport;
use gatehouse::tls::{self, CertificateReport};
use gatehouse::{Gateway, StartError};
use tokio_util::sync::CancellationToken;

/// mimalloc (without transparent huge pages) instead of glibc malloc: ~9% less CPU per
/// proxied request and no more RSS per idle connection (measured with loadtest/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_CONFIG: u8 = 64;
/// Connect, write and probe-answer limit of the admin client (`health`, `reload`).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
const EXIT_CERTIFICATE: u8 = 65;
/// `check --probe`: the app answered, and at least one answer shows a misconfiguration.
const EXIT_PROBE_PROBLEM: u8 = 3;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "HTTPS gateway: TLS, redirect, reverse proxy, WebSockets, rate limiting"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "GATEHOUSE_CONFIG",
        default_value = "gateway.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and every certificate without listening, like `nginx -t`.
    Check(CheckArgs),
    /// Ask a running gateway's admin listener whether it is ready (for Docker HEALTHCHECK).
    Health,
    /// Ask the running gateway to reload its configuration file, and print the outcome.
    /// Only `[admin] listen` and `token_file` are read here; the gateway validates the rest.
    Reload,
    /// Ask the running gateway to order a new ACME certificate now (`[acme]`), wait for
    /// it and print the outcome. Reads only `[admin] listen` and `token_file`.
    Renew,
}

/// `gatehouse check` options: `--probe` and what it tries.
/// (The field docs are `--help` text, where backticks would show: hence the allow.)
#[derive(clap::Args)]
#[allow(clippy::doc_markdown)]
struct CheckArgs {
    /// Then send the running app what the gateway would send for each name (Host,
    /// X-Forwarded-*), and explain its answers (ALLOWED_HOSTS, SECURE_PROXY_SSL_HEADER,
    /// CSRF_TRUSTED_ORIGINS, Channels' origin check, static files). Safe methods only,
    /// unless --csrf-url is given.
    #[arg(long)]
    probe: bool,
    /// Path of the host and scheme request.
    #[arg(long, default_value = "/", requires = "probe", value_name = "PATH")]
    probe_path: String,
    /// A page that sets the csrftoken cookie and accepts a POST: the CSRF probe GETs it,
    /// then POSTs to it once or twice (off by default: no POST is sent without it).
    #[arg(long, requires = "probe", value_name = "PATH")]
    csrf_url: Option<String>,
    /// A WebSocket path to handshake with (repeatable; none by default).
    #[arg(long = "websocket-path", requires = "probe", value_name = "PATH")]
    websocket_paths: Vec<String>,
    /// The app's STATIC_URL, to check that the gateway or the app serves it.
    #[arg(long, requires = "probe", value_name = "URL")]
    static_url: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::Reload)) {
        return reload(&cli.config);
    }
    if matches!(cli.command, Some(Command::Renew)) {
        return renew(&cli.config);
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("gatehouse: invalid configuration {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check(args) => check(&config, &args),
        Command::Health => health(&config),
        Command::Run => run(config),
        Command::Reload | Command::Renew => unreachable!("handled above"),
    }
}

fn run(config: Config) -> ExitCode {
    let (_log_guard, log_level) = init_logging(&config);
    // One worker: a current-thread runtime skips work-stealing and cross-thread wake-ups,
    // which is measurably faster when the gateway is pinned to one core.
    let mut runtime = if config.server.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all();
    if config.server.worker_threads > 1 {
        runtime.worker_threads(config.server.worker_threads);
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Once, in the log (structured when `log.format = "json"`). A `StartError`
            // already carries its cause in its message; `{:#}` would repeat it.
            if let Some(start) = err.downcast_ref::<StartError>() {
                tracing::error!("{start}");
            } else {
                tracing::error!("{err:#}");
            }
            let code = match err.downcast_ref::<StartError>() {
                Some(StartError::Certificate(_)) => EXIT_CERTIFICATE,
                _ => 1,
            };
            ExitCode::from(code)
        }
    }
}

async fn serve(config: Config, log_level: Option<LogLevelHook>) -> anyhow::Result<()> {
    let mut gateway = Gateway::bind(config).await?;
    if let Some(hook) = log_level {
        gateway.on_log_level(hook);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    // Installed before serving: SIGHUP's default action would end the process.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => {
            tokio::spawn(reload_on_hangup(hangup, gateway.reload_handle()));
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot install the SIGHUP handler; use `gatehouse reload` (certificates still reload on file changes)");
        }
    }
    gateway.run(shutdown).await?;
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
    shutdown.cancel();
}

/// Each SIGHUP reloads the configuration file and re-reads every certificate (even when
/// the file is refused); the outcome is logged.
async fn reload_on_hangup(mut hangup: tokio::signal::unix::Signal, reload: ReloadHandle) {
    while hangup.recv().await.is_some() {
        tracing::info!(
            signal = "SIGHUP",
            "configuration and certificate reload requested"
        );
        reload.reload();
    }
}

/// The filter for `log.level`. rustls warns about what peers send (an IP address as SNI:
/// wrk and curl do it), so its warnings are the client's to cause; they stay out of the
/// default log. The crate is also built without its `logging` feature, and the
/// workspace's load-test tools too, so feature unification cannot bring them back.
fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::try_new(format!("{level},rustls=error,hyper=warn,h2=warn"))
        .map_err(|err| err.to_string())
}

/// Sets up logging; also returns the hook reloads change `log.level` through (none when
/// `RUST_LOG` overrides the file).
fn init_logging(
    config: &Config,
) -> (
    tracing_appender::non_blocking::WorkerGuard,
    Option<LogLevelHook>,
) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::EnvFilter;
    let from_env = EnvFilter::try_from_default_env().ok();
    let overridden = from_env.is_some();
    let filter = from_env
        .or_else(|| log_filter(&config.log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Lines are written on a background thread so a slow terminal or pipe never stalls
    // a request; the guard flushes them at exit.
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(true);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log.format {
        LogFormat::Json => registry.with(lines.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(lines).init(),
    }
    let hook: Option<LogLevelHook> = (!overridden).then(|| {
        Box::new(move |level: &str| {
            handle
                .reload(log_filter(level)?)
                .map_err(|err| err.to_string())
        }) as LogLevelHook
    });
    (guard, hook)
}

fn check(config: &Config, args: &CheckArgs) -> ExitCode {
    println!("configuration {}: OK", config.source.display());
    let provider = tls::provider();
    let mut certificate_failed = false;
    let mut served_names: Vec<String> = Vec::new();
    for source in &config.tls.certificates {
        println!();
        println!(
            "certificate {} ({})",
            source.cert.display(),
            source.key_path
        );
        match tls::certs::load(
            source,
            &provider,
            SystemTime::now(),
            config.tls.expiry_warning_days,
        ) {
            Ok(loaded) => {
                print_report(&loaded.report);
                served_names.extend(
                    loaded
                        .report
                        .names
                        .iter()
                        .filter(|name| name.parse::<std::net::IpAddr>().is_err())
                        .cloned(),
                );
            }
            Err(err) => {
                certificate_failed = true;
                println!("  verdict:   FAIL");
                println!("  error:     {err}");
            }
        }
    }
    if let Some(acme) = &config.acme {
        served_names.extend(acme.names.iter().cloned());
        print_acme(config, acme, &provider);
    }
    print_routes(config);
    let missing = config.warnings();
    for warning in &missing {
        println!("\nwarning: {warning}");
    }
    println!();
    print_django_hint(config, &served_names);
    if certificate_failed {
        println!("\nresult: FAIL (fix the files above; `gatehouse check` again before starting)");
        if args.probe {
            println!("(the app was not probed: fix the certificates first)");
        }
        ExitCode::from(EXIT_CERTIFICATE)
    } else if args.probe {
        println!("\nresult: OK");
        probe(config, &served_names, args)
    } else {
        println!("\nresult: OK");
        ExitCode::SUCCESS
    }
}

/// The routing table, when there are routes: what goes where, in file order.
fn print_routes(config: &Config) {
    if config.routes.is_empty() {
        return;
    }
    let groups = config.groups();
    println!();
    println!("routes (the most specific wins: exact host, then *.host, then longest prefix):");
    for (index, route) in config.routes.iter().enumerate() {
        let targets = groups
            .get(route.group)
            .map_or_else(String::new, |(_, group)| {
                group
                    .targets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            });
        println!(
            "  route[{index}] {} {} -> {} ({targets})",
            route.host.as_deref().unwrap_or("*"),
            route.prefix,
            route.upstream
        );
    }
    println!("  otherwise -> default ({})", {
        config
            .upstream
            .targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    });
}

/// The ACME settings and what `acme.storage` holds (account, certificate); never a
/// failure: a missing or refused certificate is ordered at start.
fn print_acme(
    config: &Config,
    acme: &gatehouse::config::acme::AcmeConfig,
    provider: &rustls::crypto::CryptoProvider,
) {
    println!();
    println!("acme ({})", acme.directory);
    println!("  names:     {}", acme.names.join(", "));
    println!("  challenge: {}", acme.challenge.as_str());
    println!("  storage:   {}", acme.storage.display());
    println!(
        "  renew:     with {} or a third of the lifetime left, whichever is smaller",
        humantime::format_duration(acme.renew_before)
    );
    match &config.redis {
        Some(redis) => println!(
            "  instances: coordinated through Redis ({} = {}): one orders, all serve",
            redis.key,
            redis.redacted()
        ),
        None => println!(
            "  instances: this one alone (no [redis]: several instances would each order their own certificate)"
        ),
    }
    match tls::acme::storage::account_summary(&acme.storage) {
        Some(account) if account.directory == acme.directory => {
            println!("  account:   {} ({})", account.id, account.email);
        }
        Some(account) => println!(
            "  account:   {} is for another directory ({}); a new account is created at start",
            account.id, account.directory
        ),
        None => println!("  account:   none yet (created at the first order)"),
    }
    let source = tls::acme::certificate_source(acme);
    match tls::certs::load(
        &source,
        provider,
        SystemTime::now(),
        config.tls.expiry_warning_days,
    ) {
        Ok(loaded) => {
            println!("  certificate {}", source.cert.display());
            print_report(&loaded.report);
        }
        Err(_) if !source.cert.exists() => println!(
            "  certificate: none yet; a self-signed placeholder is served until the first one is issued"
        ),
        Err(err) => {
            println!("  certificate: not served: {err}");
            println!("  (a new one is ordered at start; the placeholder serves meanwhile)");
        }
    }
}

/// `check --probe`: one line per probe, then a verdict; the exit code says which.
fn probe(config: &Config, served_names: &[String], args: &CheckArgs) -> ExitCode {
    let configured: Vec<String> = config
        .tls
        .certificates
        .iter()
        .flat_map(|source| source.names.iter().cloned())
        .collect();
    let names = if configured.is_empty() {
        served_names.to_vec()
    } else {
        configured
    };
    let options = ProbeOptions {
        path: args.probe_path.clone(),
        csrf_url: args.csrf_url.clone(),
        websocket_paths: args.websocket_paths.clone(),
        static_url: args.static_url.clone(),
        ..ProbeOptions::default()
    };
    let upstream = config
        .upstream
        .targets
        .first()
        .map_or_else(String::new, ToString::to_string);
    let groups = if config.upstreams.is_empty() {
        String::new()
    } else {
        " (and each [upstreams] group its routes reach)".to_owned()
    };
    println!("\nprobing the app at {upstream}{groups} as the gateway would forward to it:");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("gatehouse check: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let findings = match runtime.block_on(gatehouse::probe::probe(config, &names, &options)) {
        Ok(findings) => findings,
        Err(err) => {
            println!("\nprobe: FAIL: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = 0;
    for finding in &findings {
        let verdict = match finding.verdict {
            Verdict::Ok => "OK",
            Verdict::Problem => {
                problems += 1;
                "PROBLEM"
            }
            Verdict::Unknown => "UNKNOWN",
        };
        println!(
            "  {verdict:<7} {:<9} {} [{}]: {}",
            finding.check.label(),
            finding.name,
            finding.request,
            finding.detail
        );
        if let Some(fix) = &finding.fix {
            println!("          fix: {fix}");
        }
    }
    if problems == 0 {
        println!("\nprobe: OK");
        ExitCode::SUCCESS
    } else {
        println!("\nprobe: {problems} PROBLEM(S) (fix the app's settings above, restart it, probe again)");
        ExitCode::from(EXIT_PROBE_PROBLEM)
    }
}

fn print_report(report: &CertificateReport) {
    println!("  subject:   {}", report.subject);
    println!("  names:     {}", report.names.join(", "));
    println!("  chain:     {}", report.chain.join(" <- "));
    println!(
        "  not after: {} ({} days left)",
        report.not_after, report.days_left
    );
    println!("  key:       {}", report.key_type);
    println!("  serial:    {}", report.serial);
    for warning in &report.warnings {
        println!("  warning:   {warning}");
    }
    let verdict = if report.warnings.is_empty() {
        "OK"
    } else {
        "OK with warnings"
    };
    println!("  verdict:   {verdict}");
}

/// `served_names`: DNS names of the certificates that loaded, used when the config names
/// none.
fn print_django_hint(config: &Config, served_names: &[String]) {
    let configured: Vec<&str> = config
        .tls
        .certificates
        .iter()
        .flat_map(|source| source.names.iter().map(String::as_str))
        .collect();
    let hosts = if !configured.is_empty() {
        configured
    } else if !served_names.is_empty() {
        served_names.iter().map(String::as_str).collect()
    } else {
        vec!["example.com"]
    };
    let port = match config.listen.public_https_port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    println!("Django settings for an app behind Gatehouse:");
    println!("  SECURE_PROXY_SSL_HEADER = (\"HTTP_X_FORWARDED_PROTO\", \"https\")");
    println!("  USE_X_FORWARDED_HOST = False  # Host is passed through unchanged");
    println!(
        "  ALLOWED_HOSTS = [{}]",
        hosts
            .iter()
            .map(|h| format!("\"{h}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  CSRF_TRUSTED_ORIGINS = [{}]",
        hosts
            .iter()
            .map(|h| format!("\"https://{h}{port}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  # Channels: wrap the websocket router in AllowedHostsOriginValidator");
}

fn health(config: &Config) -> ExitCode {
    match probe_ready(config) {
        Ok(summary) => {
            println!("gatehouse health: {summary}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("gatehouse health: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Asks the admin listener's `/readyz` and returns a one-line summary when ready.
fn probe_ready(config: &Config) -> anyhow::Result<String> {
    let admin = config.admin.as_ref().context(
        "no [admin] listen address in the config; add [admin] listen = \"127.0.0.1:9090\"",
    )?;
    let (addr, status_line, body) =
        admin_request(admin.listen, "GET", "/readyz", None, PROBE_TIMEOUT)
            .map_err(|err| anyhow::anyhow!("not ready: {err:#}"))?;
    let report: Option<Readiness> = serde_json::from_str(body.trim()).ok();
    match report {
        Some(report) if report.ready && status_line.contains(" 200 ") => {
            if report.degraded.is_empty() {
                Ok(format!("ready ({addr})"))
            } else {
                Ok(format!(
                    "ready ({addr}), degraded: {}",
                    report.degradations()
                ))
            }
        }
        Some(report) => anyhow::bail!("not ready: {}", report.failures()),
        None => anyhow::bail!("not ready: {addr} answered {status_line:?}"),
    }
}

/// `gatehouse reload`: `POST /reload` to the admin listener named in `path`, the outcome
/// printed; exit 0 when applied (or unchanged), 1 when refused or unreachable.
fn reload(path: &std::path::Path) -> ExitCode {
    match request_reload(path) {
        Ok(report) => {
            print_reload(&report);
            if report.refused() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("gatehouse reload: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_reload(report: &ReloadReport) {
    match report.outcome.as_str() {
        "refused" => {
            println!("gatehouse reload: refused: {}", report.file);
            for problem in &report.problems {
                println!("  {problem}");
            }
            println!("the running configuration keeps serving; fix the file and reload again");
        }
        "unchanged" => println!("gatehouse reload: unchanged: {}", report.file),
        _ => println!(
            "gatehouse reload: applied: {} (changed: {})",
            report.file,
            report.changed.join(", ")
        ),
    }
    if !report.restart_needed.is_empty() {
        println!(
            "  needs a restart to take effect: {}",
            report.restart_needed.join(", ")
        );
    }
}

/// `gatehouse renew`: `POST /acme/renew`, the outcome printed; exit 0 when a certificate
/// was issued, 1 otherwise.
fn renew(path: &std::path::Path) -> ExitCode {
    let result = admin_settings(path).and_then(|(listen, token)| {
        // An order takes seconds to minutes (the gateway gives up after 5).
        let timeout = std::time::Duration::from_secs(330);
        let (addr, status_line, body) =
            admin_request(listen, "POST", "/acme/renew", token.as_deref(), timeout)?;
        serde_json::from_str::<AttemptReport>(body.trim())
            .with_context(|| format!("{addr} answered {status_line:?}: {}", body.trim()))
    });
    match result {
        Ok(report) if report.outcome == "issued" => {
            println!(
                "gatehouse renew: issued: serial {} (not after {}), served now",
                report.serial.unwrap_or_default(),
                report.not_after.unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!(
                "gatehouse renew: failed: {}",
                report.error.unwrap_or_default()
            );
            println!("the current certificate keeps serving");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("gatehouse renew: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn request_reload(path: &std::path::Path) -> anyhow::Result<ReloadReport> {
    let (listen, token) = admin_settings(path)?;
    // A reload may wait for a new Redis connection or a slow disk; probes answer at once.
    let (addr, status_line, body) = admin_request(
        listen,
        "POST",
        "/reload",
        token.as_deref(),
        PROBE_TIMEOUT * 10,
    )?;
    serde_json::from_str(body.trim())
        .with_context(|| format!("{addr} answered {status_line:?}: {}", body.trim()))
}

/// `[admin] listen` and the token from `token_file`, read without validating the rest of
/// the file: a broken file must still reach the gateway, which reports what is wrong.
fn admin_settings(
    path: &std::path::Path,
) -> anyhow::Result<(std::net::SocketAddr, Option<String>)> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {}; pass the gateway's configuration with --config",
            path.display()
        )
    })?;
    let value: toml::Table = toml::from_str(&text).with_context(|| {
        format!(
            "{}: not valid TOML, so [admin] cannot be read",
            path.display()
        )
    })?;
    let admin = value.get("admin").and_then(toml::Value::as_table).with_context(|| {
        format!("{}: no [admin] section; the gateway reloads through its admin listener (or send it SIGHUP)", path.display())
    })?;
    let listen = admin
        .get("listen")
        .and_then(toml::Value::as_str)
        .and_then(|text| text.parse().ok())
        .with_context(|| {
            format!(
                "{}: admin.listen is missing or not an ADDR:PORT",
                path.display()
            )
        })?;
    let token = match admin.get("token_file").and_then(toml::Value::as_str) {
        Some(file) => {
            let file = path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(file);
            let token = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read admin.token_file {}", file.display()))?;
            Some(token.trim().to_owned())
        }
        None => None,
    };
    Ok((listen, token))
}

/// One HTTP/1.0 request to the admin listener (plain HTTP over a std socket: the
/// distroless image has no curl). Returns the address used, the status line and the body.
fn admin_request(
    listen: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    read_timeout: std::time::Duration,
) -> anyhow::Result<(std::net::SocketAddr, String, String)> {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .with_context(|| format!("cannot connect to the admin listener at {addr}"))?;
    stream.set_read_timeout(Some(read_timeout))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let authorization = token.map_or_else(String::new, |token| {
        format!("Authorization: Bearer {token}\r\n")
    });
    // HTTP/1.0: the reply is never chunked and ends when the connection closes.
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{authorization}Content-Length: 0\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .with_context(|| format!("no answer from the admin listener at {addr}"))?;
    let status_line = reply.lines().next().unwrap_or_default().to_owned();
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Ok((addr, status_line, body))
}
