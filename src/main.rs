//! The `comet` binary: command line, logging, and the error line at the edge.

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;
use comet::config::{Config, EMBEDDED_DEFAULT, LogFormat};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Comet: a long-connection access gateway (WebSocket clients, push RPC, etcd registry).
#[derive(FromArgs)]
struct Args {
    /// run the monitor (watch nodes in etcd, notify the message server) instead of a node
    #[argh(switch, short = 'm')]
    monitor: bool,
    /// config file (INI); default ./comet.ini, or the embedded standalone default if absent
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
    /// print the version and exit
    #[argh(switch, short = 'V')]
    version: bool,
    #[argh(subcommand)]
    command: Option<Tool>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Tool {
    Check(Check),
    Token(Token),
}

/// Parse and validate a config file, print the effective configuration (secrets
/// masked) and its warnings; exit 1 on unknown keys, 2 on errors.
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct Check {
    /// config file (INI); default ./comet.ini
    #[argh(option, short = 'c')]
    config: Option<PathBuf>,
}

/// Sign a client token (HS256 JWT, as `token_secret` verifies) and print it.
#[derive(FromArgs)]
#[argh(subcommand, name = "token")]
struct Token {
    /// file holding the secret (its first line)
    #[argh(option)]
    secret_file: PathBuf,
    /// the conn_id the token is for
    #[argh(option)]
    conn_id: String,
    /// signed client data handed back on callbacks
    #[argh(option)]
    info: Option<String>,
    /// lifetime: 90s, 30m, 1h, 7d (default 1h)
    #[argh(option, default = "String::from(\"1h\")")]
    ttl: String,
}

fn main() -> ExitCode {
    comet::app::hold_stop_signals();
    comet::panics::install_hook();
    let args = match parse_args() {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    if args.version {
        println!("comet {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    match args.command {
        Some(Tool::Check(check)) => return check_config(check.config.or(args.config)),
        Some(Tool::Token(token)) => return sign_token(&token),
        None => {}
    }
    let (config, source) = match load_config(args.config) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("comet: {err}");
            return ExitCode::from(2);
        }
    };
    let (config, warnings) = config;
    // Held to the end of main: the last lines are written before the process exits.
    let _log_writer = comet::logging::start(config.log_queue_bytes);
    init_logging(&config.log_level, config.log_format);
    tracing::info!(config = %source, version = env!("CARGO_PKG_VERSION"), "starting");
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let outcome = if args.monitor {
        comet::control::monitor::run(config)
    } else {
        comet::app::run_node(config)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("comet: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn parse_args() -> Result<Args, ExitCode> {
    let argv = normalised_args();
    let command = argv.first().map_or("comet", String::as_str);
    let rest: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    Args::from_args(&[command], &rest).map_err(|early| {
        if early.status.is_ok() {
            print!("{}", early.output);
            ExitCode::SUCCESS
        } else {
            eprintln!("{}", early.output);
            ExitCode::from(2)
        }
    })
}

/// The original accepted Go-style `-m=true` and `-c=./comet.ini`; argh wants `-m`, `-c x`.
fn normalised_args() -> Vec<String> {
    let mut out = Vec::new();
    for arg in std::env::args() {
        match arg.split_once('=') {
            // Go's flag package reads a boolean with strconv.ParseBool.
            Some(("-m" | "--monitor", "1" | "t" | "T" | "true" | "TRUE" | "True")) => {
                out.push("-m".to_owned());
            }
            Some(("-m" | "--monitor", _)) => {}
            Some((flag @ ("-c" | "--config"), value)) => {
                out.push(flag.to_owned());
                out.push(value.to_owned());
            }
            _ => out.push(arg),
        }
    }
    out
}

type Loaded = ((Config, Vec<String>), String);

fn load_config(explicit: Option<PathBuf>) -> Result<Loaded, comet::config::ConfigError> {
    let default_path = PathBuf::from("./comet.ini");
    match explicit {
        Some(path) => Ok((Config::load(&path)?, path.display().to_string())),
        None if default_path.exists() => Ok((Config::load(&default_path)?, "./comet.ini".into())),
        None => Ok((
            Config::parse(EMBEDDED_DEFAULT)?,
            "embedded default (standalone)".into(),
        )),
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(comet::logging::QueuedStderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Flattened so that a shipper finds `message` and every field at the top level.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// `comet check`: what a node would run with, without running it.
fn check_config(path: Option<PathBuf>) -> ExitCode {
    let path = path.unwrap_or_else(|| PathBuf::from("./comet.ini"));
    let (config, warnings) = match Config::load(&path) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("comet check: {}: {err}", path.display());
            return ExitCode::from(2);
        }
    };
    println!("{}", effective(&config));
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if warnings.is_empty() {
        println!("comet check: {}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "comet check: {}: {} warning(s); a node would start, but fix them",
            path.display(),
            warnings.len()
        );
        ExitCode::from(1)
    }
}

/// The settings an operator checks first, secrets shown only as set or not.
fn effective(config: &Config) -> String {
    let secret = |set: bool| if set { "(set)" } else { "(not set)" };
    let lines = [
        ("max_proc", config.max_proc.to_string()),
        (
            "socket_protocol",
            config.socket_protocol.scheme().to_owned(),
        ),
        ("websocket_port", config.websocket_port.to_string()),
        ("tcp_port", format!("{:?}", config.tcp_port)),
        ("wss_port", format!("{:?}", config.wss_port)),
        ("rpc_addr", config.rpc_addr.clone()),
        (
            "comet_rpc_token",
            secret(!config.comet_rpc_token.is_empty()).into(),
        ),
        ("comet_addr", config.comet_addr()),
        ("etcd_addr", config.etcd_endpoints.join(",")),
        ("rpc_api_url", config.rpc_api_url.clone()),
        (
            "token_secret",
            secret(!config.token_secrets.is_empty()).into(),
        ),
        ("admin_addr", format!("{:?}", config.admin_addr)),
        ("admin_token", secret(!config.admin_token.is_empty()).into()),
        ("ping_interval", format!("{:?}", config.ping_interval)),
        (
            "heartbeat_timeout",
            format!("{:?}", config.heartbeat_timeout),
        ),
        (
            "handshake_timeout",
            format!("{:?}", config.handshake_timeout),
        ),
        ("max_frame_size", config.max_frame_size.to_string()),
        (
            "outbound_queue_size",
            config.outbound_queue_size.to_string(),
        ),
        (
            "outbound_queue_bytes",
            config.outbound_queue_bytes.to_string(),
        ),
        ("drain_window", format!("{:?}", config.drain_window)),
        (
            "websocket_compression",
            match config.websocket_compression {
                Some(d) => format!("on (level {}, min_size {})", d.level, d.min_size),
                None => "off".into(),
            },
        ),
        ("sse_path", config.websocket_policy.sse_path.clone()),
        ("sse_retry", format!("{:?}", config.sse_retry)),
        (
            "recovery",
            match config.recovery_window {
                0 => "off (recovery_window = 0)".into(),
                window => format!(
                    "recovery_window {window}, recovery_ttl {:?}, recovery_bytes {}, recovery_total_bytes {}",
                    config.recovery_ttl, config.recovery_bytes, config.recovery_total_bytes
                ),
            },
        ),
        ("log_level", config.log_level.clone()),
    ];
    lines
        .iter()
        .map(|(key, value)| format!("{key} = {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `comet token`: a signed token on stdout.
fn sign_token(token: &Token) -> ExitCode {
    let secret = match std::fs::read_to_string(&token.secret_file) {
        Ok(text) => text.lines().next().unwrap_or("").trim().to_owned(),
        Err(err) => {
            eprintln!("comet token: {}: {err}", token.secret_file.display());
            return ExitCode::from(2);
        }
    };
    if secret.len() < 16 {
        eprintln!("comet token: the secret must be at least 16 bytes, as token_secret requires");
        return ExitCode::from(2);
    }
    let Some(ttl_secs) = parse_ttl(&token.ttl) else {
        eprintln!(
            "comet token: --ttl {:?}: expected e.g. 90s, 30m, 1h, 7d",
            token.ttl
        );
        return ExitCode::from(2);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let grant = comet::token::Grant {
        conn_id: &token.conn_id,
        info: token.info.as_deref(),
        now,
        ttl_secs,
    };
    println!("{}", comet::token::sign(secret.as_bytes(), &grant));
    ExitCode::SUCCESS
}

/// `90`, `90s`, `30m`, `1h`, `7d` as seconds.
fn parse_ttl(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(scale).filter(|secs| *secs > 0)
}
