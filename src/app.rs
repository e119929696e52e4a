//! Process assembly: starts the presence workers, the shards and the control thread in
//! the right order, and tears them down in the right order on a signal.
//!
//! Owns no state of its own. Start-up errors come back as [`anyhow::Error`] lines that
//! name the config key at fault; nothing here runs on a shard.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::callback::{CallbackClient, CallbackStats};
use crate::config::{Config, SocketProtocol};
use crate::control::{self, Node, NodeParts, Route};
use crate::handover::{self, Handover, Inherited};
use crate::presence::{Presence, PresenceWorkers};
use crate::shard::{self, ListenerGroup, ShardDeps};
use crate::token::keys::KeyStore;
use crate::token::{ClaimRules, TokenVerifier};
use crate::transport::{Entry, EntryKind, tls};

/// Holds SIGTERM, SIGINT, SIGHUP and SIGUSR2 pending from here until the node (or the
/// monitor) has installed its handlers: call it first thing in `main`, so that a signal
/// that arrives while the process starts stops it gracefully instead of killing it by
/// the signal's default action.
pub fn hold_stop_signals() {
    crate::sys::hold_stop_signals();
}

/// Runs a gateway node until SIGTERM/SIGINT has closed every client, or until a
/// successor started by SIGUSR2 has taken over.
pub fn run_node(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    // The control runtime and its signal handlers come before anything else: a SIGTERM
    // that arrives while the shards start (systemd stopping a node at once, a test) must
    // stop the node gracefully, not kill it with the default action (seen: exit by
    // signal 15 for a node stopped 50 ms after its start).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    let signals = {
        let _entered = runtime.enter();
        Signals::watch()?
    };
    log_limits();
    if config.etcd_endpoints.is_empty() {
        tracing::info!("etcd_addr is empty: running standalone, not registered anywhere");
    }
    let mut inherited = Inherited::from_env()?;
    let listeners = Listeners::open(&config, &mut inherited)?;

    let callback_stats = Arc::new(CallbackStats::default());
    let refuse_new_clients = Arc::new(AtomicBool::new(false));
    let callbacks = callback_client(&config, &callback_stats);
    let predecessor_notices = inherited.presence.take().map(std::fs::File::from);
    let (presence, presence_workers) = Presence::start(
        callbacks.clone(),
        config.presence_workers,
        config.callback_retries,
        config.presence_queue_bytes,
        predecessor_notices,
    );
    let (control_link, directory_requests) = crate::link::directory_channel();
    let verifier = token_verifier(&config)?;
    let token_keys = verifier.as_ref().and_then(|v| v.public_keys().cloned());
    let deps = ShardDeps {
        config: Arc::clone(&config),
        control: control_link,
        presence: presence.clone(),
        callbacks,
        refuse_new_clients: Arc::clone(&refuse_new_clients),
        verifier,
    };
    let handover_client = listeners.client_fds();
    let ports = listeners
        .client
        .into_iter()
        .map(|(_, group)| group)
        .collect();
    let shards = shard::start(deps, ports)?;
    // A successor's peer listener: where its predecessor forwards the pushes for clients
    // that moved here (`rpc::forward`). Bound before "ready", so none is refused.
    let peer = if inherited.is_handover() {
        let (listener, addr) = handover::ForwardTarget::bind_peer_listener()
            .context("cannot bind the hand-over's peer listener on loopback")?;
        inherited.signal_ready(&handover::ForwardTarget::for_listener(
            addr,
            &config.comet_rpc_token,
        ));
        Some(listener)
    } else {
        None
    };
    crate::sys::notify_systemd(&format!("READY=1\nMAINPID={}", std::process::id()));
    tracing::info!(
        shards = config.max_proc,
        websocket_port = config.websocket_port,
        tcp_port = config.tcp_port,
        wss_port = config.wss_port,
        rpc_addr = %config.rpc_addr,
        comet_addr = %config.comet_addr(),
        handover = inherited.is_handover(),
        "comet ready"
    );

    let node = Node::new(NodeParts {
        config: Arc::clone(&config),
        shards: shards.handles,
        refuse_new_clients,
        callback_stats,
        inherited_lease: inherited.lease,
        presence: presence.clone(),
    });
    let handover = Handover {
        client: handover_client,
        rpc: listeners.rpc.as_raw_fd(),
        admin: listeners.admin.as_ref().map(AsRawFd::as_raw_fd),
        lease: None,
    };
    let control_listeners = ControlListeners {
        rpc: StdTcpListener::from(listeners.rpc),
        admin: listeners.admin.map(StdTcpListener::from),
        peer,
        // Our parent until it exits (then the orphan is reparented): while it is, it
        // drains the clients it handed over.
        predecessor: inherited
            .is_handover()
            .then(std::os::unix::process::parent_id),
        forward_back: inherited.predecessor.take(),
        handover,
    };
    let outcome = run_control(
        ControlRuntime { runtime, signals },
        node,
        directory_requests,
        control_listeners,
        shards.threads,
        (presence, presence_workers),
        token_keys,
    );
    tracing::info!("comet stopped");
    outcome
}

/// Every listening socket of the node: inherited from a predecessor, or bound now.
struct Listeners {
    /// Each client port's listeners, under the port's name (for a hand-over).
    client: Vec<(&'static str, ListenerGroup)>,
    rpc: OwnedFd,
    admin: Option<OwnedFd>,
}

/// A client port: its name (the config key's short form, used in hand-overs), number,
/// and what it serves.
struct ClientPort {
    name: &'static str,
    key: &'static str,
    port: u16,
    entry: Entry,
}

/// The client ports the config asks for: `websocket_port` (WebSocket, wss or raw TCP as
/// `socket_protocol` says), and the optional extra `tcp_port` and `wss_port`.
fn client_ports(config: &Config, tls: Option<tls::Acceptor>) -> Vec<ClientPort> {
    let main = match config.socket_protocol {
        SocketProtocol::Ws => (EntryKind::WebSocket, false),
        SocketProtocol::Wss => (EntryKind::WebSocket, true),
        SocketProtocol::Tcp => (EntryKind::Tcp, config.tcp_tls),
    };
    let entry = |(kind, with_tls): (EntryKind, bool)| Entry {
        kind,
        tls: tls.clone().filter(|_| with_tls),
    };
    let mut ports = vec![ClientPort {
        name: "ws",
        key: "websocket_port",
        port: config.websocket_port,
        entry: entry(main),
    }];
    if let Some(port) = config.tcp_port {
        ports.push(ClientPort {
            name: "tcp",
            key: "tcp_port",
            port,
            entry: entry((EntryKind::Tcp, config.tcp_tls)),
        });
    }
    if let Some(port) = config.wss_port {
        ports.push(ClientPort {
            name: "wss",
            key: "wss_port",
            port,
            entry: entry((EntryKind::WebSocket, true)),
        });
    }
    ports
}

impl Listeners {
    fn open(config: &Config, inherited: &mut Inherited) -> anyhow::Result<Listeners> {
        let mut client = Vec::new();
        for port in client_ports(config, tls_acceptor(config)?) {
            let fds = bind_client_port(config, inherited.take_client(port.name), &port)?;
            let group = ListenerGroup {
                entry: port.entry,
                fds,
            };
            client.push((port.name, group));
        }
        let rpc = match inherited.rpc.take() {
            Some(fd) => {
                handover::check_listener(&fd, config.rpc_listen.port())?;
                fd
            }
            None => handover::bind_listener(config.rpc_listen, false).with_context(|| {
                format!(
                    "config key `rpc_addr`: cannot listen on {}",
                    config.rpc_listen
                )
            })?,
        };
        let admin = match (config.admin_addr, inherited.admin.take()) {
            (None, _) => None,
            (Some(addr), Some(fd)) => {
                handover::check_listener(&fd, addr.port())?;
                Some(fd)
            }
            (Some(addr), None) => Some(
                handover::bind_listener(addr, false)
                    .with_context(|| format!("config key `admin_addr`: cannot listen on {addr}"))?,
            ),
        };
        if admin.is_some() {
            tracing::info!("admin listener: /healthz /readyz /status /metrics");
        }
        Ok(Listeners { client, rpc, admin })
    }

    /// The client listeners' descriptors by port name, for a hand-over.
    fn client_fds(&self) -> Vec<(&'static str, Vec<RawFd>)> {
        self.client
            .iter()
            .map(|(name, group)| (*name, group.fds.iter().map(AsRawFd::as_raw_fd).collect()))
            .collect()
    }
}

/// One SO_REUSEPORT listener per shard on the port (inherited ones first).
fn bind_client_port(
    config: &Config,
    inherited: Vec<OwnedFd>,
    port: &ClientPort,
) -> anyhow::Result<Vec<OwnedFd>> {
    let mut fds = inherited;
    for fd in &fds {
        handover::check_listener(fd, port.port)?;
    }
    let addr = SocketAddr::from(([0, 0, 0, 0], port.port));
    while fds.len() < config.max_proc {
        let fd = handover::bind_listener(addr, true).with_context(|| {
            format!(
                "config key `{}`: cannot listen on port {}",
                port.key, port.port
            )
        })?;
        fds.push(fd);
    }
    // Accepted sockets inherit TCP_NODELAY from their listener (Linux): set once here, it
    // saves a setsockopt per connection. Set on inherited listeners too (an older
    // predecessor bound them without it).
    for fd in &fds {
        socket2::SockRef::from(fd)
            .set_tcp_nodelay(true)
            .with_context(|| {
                format!(
                    "cannot set TCP_NODELAY on the listener of port {}",
                    port.port
                )
            })?;
    }
    Ok(fds)
}

fn tls_acceptor(config: &Config) -> anyhow::Result<Option<tls::Acceptor>> {
    match (&config.wss_cert_pem, &config.wss_key_pem) {
        (Some(cert), Some(key)) if config.needs_tls() => Ok(Some(tls::acceptor(cert, key)?)),
        _ => Ok(None),
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

/// The control thread's listeners, bound before anything starts so that a taken port
/// is a start-up error, and what a hand-over passes on.
struct ControlListeners {
    rpc: StdTcpListener,
    admin: Option<StdTcpListener>,
    /// This process's peer listener, when it was handed over to (see `handover`).
    peer: Option<StdTcpListener>,
    /// The pid of the process that handed over to this one.
    predecessor: Option<u32>,
    /// Where that process takes the pushes for its clients (`rpc::forward`).
    forward_back: Option<handover::ForwardTarget>,
    handover: Handover,
}

/// How the control thread's run ended.
enum Ending {
    Signal,
    Conflict(anyhow::Error),
    HandedOver(u32, handover::Ready),
}

fn token_verifier(config: &Config) -> anyhow::Result<Option<TokenVerifier>> {
    if config.token_secrets.is_empty() && config.token_public_keys.is_empty() {
        return Ok(None);
    }
    let non_empty = |s: &String| Some(s.clone()).filter(|s| !s.is_empty());
    let rules = ClaimRules {
        audience: non_empty(&config.token_audience),
        issuer: non_empty(&config.token_issuer),
        max_age_secs: Some(config.token_max_age.as_secs()).filter(|s| *s > 0),
    };
    let mut verifier =
        TokenVerifier::new(config.token_secrets.clone(), config.token_leeway.as_secs())
            .with_rules(rules);
    let mut public_keys = 0;
    if !config.token_public_keys.is_empty() {
        let store =
            KeyStore::open(config.token_public_keys.as_ref()).context("token_public_keys")?;
        public_keys = store.current().keys.len();
        verifier = verifier.with_public_keys(Arc::new(store));
    }
    tracing::info!(
        secrets = config.token_secrets.len(),
        public_keys,
        "signed tokens verified locally; checkToken is not called"
    );
    Ok(Some(verifier))
}

/// SIGHUP and SIGUSR2: the shards see the new keys from their next handshake; a broken
/// file keeps the old keys.
fn reload_token_keys(keys: Option<&KeyStore>, signal: &str) {
    match keys.map(KeyStore::reload) {
        None => tracing::info!("{signal}: no token_public_keys to reload"),
        Some(Ok(count)) => tracing::info!(keys = count, "{signal}: token_public_keys reloaded"),
        Some(Err(err)) => {
            tracing::error!(error = %err, "{signal}: token_public_keys not reloaded; the old keys stay")
        }
    }
}

fn callback_client(config: &Config, stats: &Arc<CallbackStats>) -> Option<CallbackClient> {
    if config.rpc_api_url.is_empty() {
        if config.token_secrets.is_empty() && config.token_public_keys.is_empty() {
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

/// The control thread's runtime: directory, push RPC, admin, registration, load
/// self-check; shutdown on SIGTERM/SIGINT (or a registration conflict, which is fatal);
/// hand-over to a successor on SIGUSR2.
/// The signals the control thread acts on, watched from the start of the process.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    restart: tokio::signal::unix::Signal,
    /// SIGHUP reloads `token_public_keys` (and never stops the node).
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; must run inside the control runtime's context. A stop
    /// signal held since [`hold_stop_signals`] is delivered to them then.
    fn watch() -> anyhow::Result<Signals> {
        let signals = Signals {
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            restart: signal(SignalKind::user_defined2()).context("cannot watch SIGUSR2")?,
            hangup: signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
        };
        crate::sys::release_stop_signals();
        Ok(signals)
    }
}

/// The control thread's runtime and the signals watched since the process started.
struct ControlRuntime {
    runtime: tokio::runtime::Runtime,
    signals: Signals,
}

fn run_control(
    control: ControlRuntime,
    node: Rc<Node>,
    directory_requests: crate::link::DirectoryRequests,
    listeners: ControlListeners,
    shard_threads: Vec<glommio::ExecutorJoinHandle<()>>,
    (presence, presence_workers): (Presence, PresenceWorkers),
    token_keys: Option<Arc<KeyStore>>,
) -> anyhow::Result<()> {
    let ControlRuntime { runtime, signals } = control;
    let local = tokio::task::LocalSet::new();
    let Signals {
        mut terminate,
        mut interrupt,
        mut restart,
        mut hangup,
    } = signals;
    local.block_on(&runtime, async move {
        listeners.rpc.set_nonblocking(true)?;
        let rpc = tokio::net::TcpListener::from_std(listeners.rpc)?;
        tokio::task::spawn_local(Rc::clone(&node).serve_directory(directory_requests));
        let rpc_task =
            tokio::task::spawn_local(crate::rpc::serve(Rc::clone(&node), rpc, Route::MayForward));
        let mut peer = match listeners.peer {
            Some(listener) => Some(PeerListener::serve(&node, listener)?),
            None => None,
        };
        if let Some(target) = listeners.forward_back {
            node.forward_back_to(target);
        }
        let admin_task = match listeners.admin {
            Some(admin) => {
                admin.set_nonblocking(true)?;
                let admin = tokio::net::TcpListener::from_std(admin)?;
                Some(tokio::task::spawn_local(crate::control::admin::serve(Rc::clone(&node), admin)))
            }
            None => None,
        };
        let interval = node.config.load_check_interval;
        tokio::task::spawn_local(Rc::clone(&node).check_load(interval));
        if let Some(interval) = control::watchdog::interval_from_env() {
            tokio::task::spawn_local(control::watchdog::feed(Rc::clone(&node), interval));
        }
        let summaries = node.config.log_summary_interval;
        tokio::task::spawn_local(Rc::clone(&node).log_summaries(summaries));
        let mut registration = tokio::task::spawn_local(Rc::clone(&node).keep_registered());
        let mut handover = listeners.handover;
        let predecessor = listeners.predecessor;

        let ending = loop {
            tokio::select! {
                _ = terminate.recv() => break Ending::Signal,
                _ = interrupt.recv() => break Ending::Signal,
                conflict = &mut registration => break Ending::Conflict(match conflict {
                    Ok(conflict) => conflict.into(),
                    Err(panic) => anyhow::anyhow!("registration task failed: {panic}"),
                }),
                _ = hangup.recv() => reload_token_keys(token_keys.as_deref(), "SIGHUP"),
                _ = restart.recv() => {
                    reload_token_keys(token_keys.as_deref(), "SIGUSR2");
                    if let Some(pid) = predecessor
                        .filter(|pid| std::os::unix::process::parent_id() == *pid)
                    {
                        // A third process would know only us: the clients still on our
                        // predecessor would lose their forwarding, and their presence order.
                        restart_aborted(&anyhow::anyhow!(
                            "the previous restart is still draining (pid {pid}); signal again once it has exited"
                        ));
                        continue;
                    }
                    handover.lease = node.current_lease();
                    let listening = match peer.take() {
                        Some(listening) => Ok(listening),
                        None => PeerListener::bind(&node),
                    };
                    match listening {
                        Ok(listening) => {
                            let back = handover::ForwardTarget::for_listener(
                                listening.addr,
                                &node.config.comet_rpc_token,
                            );
                            peer = Some(listening);
                            match hand_over(&handover, &back).await {
                                Ok((pid, ready)) => break Ending::HandedOver(pid, ready),
                                Err(err) => restart_aborted(&err),
                            }
                        }
                        Err(err) => restart_aborted(&err),
                    }
                }
            }
        };
        match &ending {
            Ending::Signal => {
                tracing::info!("signal received: leaving etcd, then closing every client (a second signal exits at once)");
                // The registration task must not see the revoked lease as lost and put
                // the key back while the node drains.
                registration.abort();
                node.deregister().await;
            }
            Ending::Conflict(conflict) => tracing::error!("{conflict}; shutting down"),
            Ending::HandedOver(pid, ready) => {
                tracing::info!(successor = pid, "successor serving: draining this process");
                node.handed_over(ready.forward.clone());
                let notices = &ready.notices;
                // Before any client is closed: the successor holds back the `online` of
                // each conn_id listed here until this process has delivered its `offline`.
                presence.successor_serving();
                let held = node.stop_announcing().await;
                let presence = presence.clone();
                match notices.try_clone() {
                    Ok(notices) => {
                        let _ = std::thread::Builder::new()
                            .name("presence-handover".into())
                            .spawn(move || presence.hand_over(notices, held));
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot tell the successor about presence; it waits for its deadline")
                    }
                }
                // The successor owns the key (it took our lease over) and the listeners.
                registration.abort();
                node.stop_registering();
                rpc_task.abort();
                if let Some(admin) = admin_task {
                    admin.abort();
                }
            }
        }
        // Not after a hand-over: systemd follows the successor (its MAINPID) by then, and
        // under NotifyAccess=all a STOPPING=1 from us would read as the service stopping.
        if !matches!(ending, Ending::HandedOver(..)) {
            crate::sys::notify_systemd("STOPPING=1");
        }
        node.shutdown_shards();
        let joined = tokio::task::spawn_blocking(move || {
            for thread in shard_threads {
                let _ = thread.join();
            }
        });
        let limit = stop_limit(&node.config);
        let joined = async {
            let _ = joined.await;
            // No client left here: the successor's forwards would all fail. Closing the
            // peer listener makes it stop sending them (a refused connect).
            if let Some(peer) = peer.take() {
                peer.task.abort();
            }
        };
        tokio::select! {
            () = joined => {}
            _ = tokio::time::sleep(limit) => {
                tracing::error!(limit = ?limit, "shards did not stop in time; exiting without them");
                std::process::exit(1);
            }
            _ = terminate.recv() => exit_now(),
            _ = interrupt.recv() => exit_now(),
        }
        if matches!(ending, Ending::HandedOver(..)) {
            tokio::select! {
                ((), ()) = async { tokio::join!(move_rpc_clients(&node), answer_admin_requests(&node)) } => {}
                _ = terminate.recv() => exit_now(),
                _ = interrupt.recv() => exit_now(),
            }
        }
        // No shard is left to queue an event. Within a bound, and a second signal still
        // ends it: a node stopped with 4,000 callbacks queued for a message server
        // answering in 200 ms ignored two more signals, and SIGKILL ended it.
        tracing::info!(
            backlog = presence.backlog(),
            "delivering the last presence callbacks"
        );
        presence.finish();
        let drained = tokio::task::spawn_blocking(move || presence_workers.join());
        tokio::select! {
            _ = drained => {}
            _ = tokio::time::sleep(PRESENCE_DRAIN_LIMIT) => {
                tracing::error!(
                    limit = ?PRESENCE_DRAIN_LIMIT,
                    backlog = presence.backlog(),
                    "presence callbacks not delivered in time; exiting without them"
                );
                std::process::exit(1);
            }
            _ = terminate.recv() => exit_now(),
            _ = interrupt.recv() => exit_now(),
        }
        match ending {
            Ending::Conflict(conflict) => Err(conflict),
            Ending::Signal | Ending::HandedOver(..) => Ok(()),
        }
    })
}

/// A SIGUSR2 that did not hand over: logged, and told to systemd as the unit's status
/// text (`tuning/comet-reload.sh` waits for either the successor's MAINPID or this).
fn restart_aborted(err: &anyhow::Error) {
    tracing::error!("restart aborted, still serving: {err:#}");
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let why = format!("{err:#}").replace('\n', " ");
    crate::sys::notify_systemd(&format!("STATUS=restart failed at {when}: {why}"));
}

/// A hand-over's peer listener, served (`rpc::forward`): the calls arriving on it were
/// forwarded by the other process and are answered from here only.
struct PeerListener {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PeerListener {
    fn bind(node: &Rc<Node>) -> anyhow::Result<PeerListener> {
        let (listener, _) = handover::ForwardTarget::bind_peer_listener()
            .context("cannot bind the hand-over's peer listener on loopback")?;
        PeerListener::serve(node, listener)
    }

    fn serve(node: &Rc<Node>, listener: StdTcpListener) -> anyhow::Result<PeerListener> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let task = tokio::task::spawn_local(crate::rpc::serve(
            Rc::clone(node),
            listener,
            Route::HereOnly,
        ));
        Ok(PeerListener { addr, task })
    }
}

/// Once the draining process has no clients left: closes each RPC connection as soon as
/// it is idle (its calls answered), so that message servers reconnect to the successor,
/// and waits (bounded) for them to go. Until a connection goes, its pushes are forwarded.
async fn move_rpc_clients(node: &Node) {
    node.move_rpc_clients();
    let open = node.rpc_connections();
    let deadline = tokio::time::Instant::now() + RPC_MOVE_TIMEOUT;
    while node.rpc_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::info!(
        moved = open - node.rpc_connections().min(open),
        still_open = node.rpc_connections(),
        "rpc clients told to reconnect to the successor"
    );
}

/// Waits (bounded) until the admin requests accepted before the hand-over are answered:
/// they would be dropped with the runtime.
async fn answer_admin_requests(node: &Node) {
    let deadline = tokio::time::Instant::now() + ADMIN_ANSWER_TIMEOUT;
    while node.admin_requests() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An admin request is read within 5 s of its accept, and answered at once (a readiness
/// probe of a process that handed over asks no shard).
const ADMIN_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);

/// How long a draining process waits for its RPC connections to finish their calls and
/// close: a call in flight waits on shards for at most 10 s, then on the successor.
const RPC_MOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Starts the successor and waits (bounded) until it serves; kills it if it does not,
/// and reaps it either way so that a failed successor leaves no zombie.
async fn hand_over(
    handover: &Handover,
    back: &handover::ForwardTarget,
) -> anyhow::Result<(u32, handover::Ready)> {
    let successor = handover.spawn_successor(back)?;
    let pid = successor.pid;
    tracing::info!(
        successor = pid,
        "SIGUSR2: successor started with our listeners"
    );
    let ready = tokio::task::spawn_blocking(move || successor.wait_ready());
    match tokio::time::timeout(SUCCESSOR_READY_TIMEOUT, ready).await {
        Ok(Ok(Some(ready))) => Ok((pid, ready)),
        outcome => {
            crate::sys::kill_child(pid);
            let reaped =
                tokio::task::spawn_blocking(move || handover::reap(pid, REAP_TIMEOUT)).await;
            if !matches!(reaped, Ok(true)) {
                tracing::warn!(
                    successor = pid,
                    "failed successor not reaped within {REAP_TIMEOUT:?}"
                );
            }
            match outcome {
                Err(_) => {
                    anyhow::bail!("successor {pid} not ready within {SUCCESSOR_READY_TIMEOUT:?}")
                }
                _ => anyhow::bail!("successor {pid} exited before it was ready (see its log)"),
            }
        }
    }
}

/// The longest a stop may take: the drain window, then a handshake still in flight and
/// its closing handshake (what a shard waits for), plus slack for a loaded machine.
fn stop_limit(config: &Config) -> std::time::Duration {
    config.drain_window
        + config.handshake_timeout
        + config.close_timeout * 2
        + std::time::Duration::from_secs(10)
}

/// How long a stopping node goes on delivering queued presence callbacks: 100,000
/// `offline`s take ~94 s against a message server answering in 10 ms with 16 lanes
/// (README, `presence_workers`); the unit's `TimeoutStopSec=120` leaves room for the
/// drain before it.
const PRESENCE_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(100);

/// How long a killed successor may take to exit (SIGKILL: milliseconds).
const REAP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a successor may take to start serving.
const SUCCESSOR_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn exit_now() -> ! {
    tracing::warn!("second signal: exiting without waiting for clients");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_client_sockets_inherit_tcp_nodelay_from_the_listener() {
        let (config, _) = Config::parse(crate::config::EMBEDDED_DEFAULT).unwrap();
        // A port found free may be taken before it is bound again (an outgoing
        // connection of a test beside this one got it once): a few tries.
        let (port, fds) = (0..10)
            .find_map(|_| {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = probe.local_addr().unwrap().port();
                drop(probe);
                let client_port = ClientPort {
                    name: "ws",
                    key: "websocket_port",
                    port,
                    entry: Entry {
                        kind: EntryKind::WebSocket,
                        tls: None,
                    },
                };
                bind_client_port(&config, Vec::new(), &client_port)
                    .ok()
                    .map(|fds| (port, fds))
            })
            .expect("a free port in ten tries");
        let listener = StdTcpListener::from(fds.into_iter().next().unwrap());
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
