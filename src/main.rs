//! The `comet` binary: command line, logging, and the error line at the edge.

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;
use comet::config::{Config, EMBEDDED_DEFAULT};

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
}

fn main() -> ExitCode {
    comet::panics::install_hook();
    let args = match parse_args() {
        Ok(args) => args,
        Err(exit) => return exit,
    };
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
    init_logging(&config.log_level);
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
            Some(("-m" | "--monitor", value)) => {
                if value.eq_ignore_ascii_case("true") || value == "1" {
                    out.push("-m".to_owned());
                }
            }
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

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(comet::logging::QueuedStderr)
        .init();
}
