//! Process assembly: starts the presence workers, the shards and the control thread in
//! the right order, and tears them down in the right order on a signal.
//!
//! Owns no state of its own. Start-up errors come back as [`anyhow::Error`] lines that
//! name the config key at fault; nothing here runs on a shard.

use std::net::TcpListener as StdTcpListener;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::callback::{CallbackClient, CallbackStats, Presence};
use crate::config::{Config, SocketProtocol};
use crate::control::{self, Node, NodeParts};
use crate::shard::{self, ShardDeps};
use crate::token::TokenVerifier;

/// Presence worker threads: enough to overlap a few slow callbacks, few enough that a
/// message server that is down is not hammered.
const PRESENCE_WORKERS: usize = 4;

/// Runs a gateway node until SIGTERM/SIGINT has closed every client.
pub fn run_node(config: Config) -> anyhow::Result<()> {
    refuse_unbuilt_transports(&config)?;
    let config = Arc::new(config);
    log_limits();
    if config.etcd_endpoints.is_empty() {
        tracing::info!("etcd_addr is empty: running standalone, not registered anywhere");
    }
    let rpc_listener = StdTcpListener::bind(config.rpc_listen).with_context(|| {
        format!(
            "config key `rpc_addr`: cannot listen on {}",
            config.rpc_listen
        )
    })?;
    rpc_listener.set_nonblocking(true)?;
    let admin_listener = bind_admin(&config)?;

    let callback_stats = Arc::new(CallbackStats::default());
    let refuse_new_clients = Arc::new(AtomicBool::new(false));
    let callbacks = callback_client(&config, &callback_stats);
    let (presence, presence_workers) =
        Presence::start(callbacks.clone(), PRESENCE_WORKERS, config.callback_retries);
    let (control_link, directory_requests) = control::link();
    let shards = shard::start(ShardDeps {
        config: Arc::clone(&config),
        control: control_link,
        presence: presence.clone(),
        callbacks,
        refuse_new_clients: Arc::clone(&refuse_new_clients),
        verifier: token_verifier(&config),
    })?;
    tracing::info!(
        shards = config.max_proc,
        websocket_port = config.websocket_port,
        rpc_addr = %config.rpc_addr,
        comet_addr = %config.comet_addr(),
        "comet ready"
    );

    let node = Node::new(NodeParts {
        config: Arc::clone(&config),
        shards: shards.handles,
        refuse_new_clients,
        callback_stats,
    });
    let listeners = ControlListeners {
        rpc: rpc_listener,
        admin: admin_listener,
    };
    let outcome = run_control(node, directory_requests, listeners, shards.threads);
    drop(presence);
    tracing::info!("delivering the last presence callbacks");
    presence_workers.join();
    tracing::info!("comet stopped");
    outcome
}

fn refuse_unbuilt_transports(config: &Config) -> anyhow::Result<()> {
    match config.socket_protocol {
        SocketProtocol::Ws => Ok(()),
        other => anyhow::bail!(
            "config key `socket_protocol`: {} is not available in this build yet (only ws/websocket)",
            other.scheme()
        ),
    }
}

fn log_limits() {
    match crate::sys::raise_nofile_limit() {
        Ok(limits) => tracing::info!(
            soft_before = limits.before,
            soft_now = limits.after,
            hard = limits.hard,
            "open-files limit raised to the hard limit"
        ),
        Err(err) => tracing::warn!(error = %err, "could not raise the open-files limit"),
    }
}

fn bind_admin(config: &Config) -> anyhow::Result<Option<StdTcpListener>> {
    let Some(addr) = config.admin_addr else {
        return Ok(None);
    };
    let listener = StdTcpListener::bind(addr)
        .with_context(|| format!("config key `admin_addr`: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    tracing::info!(%addr, "admin listener: /healthz /readyz /status /metrics");
    Ok(Some(listener))
}

/// The control thread's listeners, bound before anything starts so that a taken port
/// is a start-up error.
struct ControlListeners {
    rpc: StdTcpListener,
    admin: Option<StdTcpListener>,
}

fn token_verifier(config: &Config) -> Option<TokenVerifier> {
    if config.token_secrets.is_empty() {
        return None;
    }
    tracing::info!(
        secrets = config.token_secrets.len(),
        "signed tokens verified locally; checkToken is not called"
    );
    Some(TokenVerifier::new(
        config.token_secrets.clone(),
        config.token_leeway.as_secs(),
    ))
}

fn callback_client(config: &Config, stats: &Arc<CallbackStats>) -> Option<CallbackClient> {
    if config.rpc_api_url.is_empty() {
        if config.token_secrets.is_empty() {
            tracing::warn!(
                "rpc_api_url is empty: every token is accepted and presence is not reported"
            );
        } else {
            tracing::warn!("rpc_api_url is empty: presence is not reported");
        }
        return None;
    }
    Some(CallbackClient::new(
        &config.rpc_api_url,
        &config.rpc_user_agent,
        &config.rpc_addr,
        config.callback_timeout,
        Arc::clone(stats),
    ))
}

/// The control thread's runtime: directory, push RPC, registration, load self-check,
/// and shutdown on a signal (or on a registration conflict, which is fatal).
fn run_control(
    node: Rc<Node>,
    directory_requests: control::DirectoryRequests,
    listeners: ControlListeners,
    shard_threads: Vec<glommio::ExecutorJoinHandle<()>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let rpc = tokio::net::TcpListener::from_std(listeners.rpc)?;
        tokio::task::spawn_local(Rc::clone(&node).serve_directory(directory_requests));
        tokio::task::spawn_local(crate::rpc::serve(Rc::clone(&node), rpc));
        if let Some(admin) = listeners.admin {
            let admin = tokio::net::TcpListener::from_std(admin)?;
            tokio::task::spawn_local(crate::control::admin::serve(Rc::clone(&node), admin));
        }
        let interval = node.config.load_check_interval;
        tokio::task::spawn_local(Rc::clone(&node).check_load(interval));
        let registration = tokio::task::spawn_local(Rc::clone(&node).keep_registered());

        let fatal = tokio::select! {
            _ = terminate.recv() => None,
            _ = interrupt.recv() => None,
            conflict = registration => Some(conflict),
        };
        match &fatal {
            Some(Ok(conflict)) => tracing::error!("{conflict}; shutting down"),
            Some(Err(panic)) => tracing::error!("registration task failed: {panic}; shutting down"),
            None => {
                tracing::info!("signal received: leaving etcd, then closing every client (a second signal exits at once)");
                node.deregister().await;
            }
        }
        node.shutdown_shards();
        let joined = tokio::task::spawn_blocking(move || {
            for thread in shard_threads {
                let _ = thread.join();
            }
        });
        tokio::select! {
            _ = joined => {}
            _ = terminate.recv() => exit_now(),
            _ = interrupt.recv() => exit_now(),
        }
        match fatal {
            Some(Ok(conflict)) => Err(conflict.into()),
            Some(Err(panic)) => Err(anyhow::anyhow!("registration task failed: {panic}")),
            None => Ok(()),
        }
    })
}

fn exit_now() -> ! {
    tracing::warn!("second signal: exiting without waiting for clients");
    std::process::exit(1)
}
