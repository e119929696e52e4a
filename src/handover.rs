//! Zero-downtime restart by listener hand-over (the nginx binary-upgrade pattern).
//!
//! On SIGUSR2 a node starts its successor (the same executable path and arguments) with
//! its listening sockets inherited: the client listeners of every shard, the push RPC
//! listener and the admin listener, plus its etcd lease id so the successor can take
//! the node's key over without a gap. The successor adopts the sockets instead of
//! binding, starts, and says so through a pipe; only then does the old process stop
//! accepting and drain. Because the sockets themselves are shared (not re-bound), their
//! accept queues are never dropped: no connection attempt is refused during a restart.
//!
//! The hand-over travels in one environment variable, `COMET_HANDOVER`, e.g.
//! `ws=5,6;tcp=10,11;rpc=7;admin=8;lease=694d7f0b3a2c1e01;ready=9;presence=12;back=13`: each client port's
//! listeners under that port's name (`ws` for `websocket_port` whatever it serves, `tcp`
//! for `tcp_port`, `wss` for `wss_port`).
//!
//! The successor says "ready" by writing `R` to the `ready` pipe, followed by one JSON
//! object naming where its push RPC answers and with which token
//! (`{"rpc":"127.0.0.1:8902","token":"…"}`), then closing the pipe: the draining process
//! forwards to it the pushes for ids it no longer holds (`rpc/forward.rs`). A predecessor
//! that reads only the `R` (an older binary) ignores the rest.
//!
//! The other way round too: a message server that connects while the old process drains
//! reaches the successor (the old one no longer accepts), and its pushes to clients still
//! on the old process would fail. So the old process also writes, into the `back` pipe
//! before the successor starts, the same kind of object for itself, and the successor
//! forwards there the pushes for ids it does not hold, until that address refuses. Each
//! side's forwarding address is a private loopback listener of its own (the *peer*
//! listener), not the shared RPC listener: a call that arrives on a peer listener is never
//! forwarded again, so no push can go back and forth.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Command;

use socket2::{Domain, Protocol, Socket, Type};

/// The environment variable carrying the hand-over.
pub(crate) const ENV: &str = "COMET_HANDOVER";
/// Backlog of every listener (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Why a hand-over could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    #[error("malformed {ENV}: {0}")]
    Malformed(String),
    #[error("inherited descriptor {fd} is not a TCP listener on port {port}")]
    NotOurListener { fd: RawFd, port: u16 },
    #[error("cannot start the successor: {0}")]
    Spawn(io::Error),
}

/// What a successor inherited from its predecessor.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    /// Client listeners (one per shard of the predecessor), by port name.
    pub(crate) client: Vec<(String, Vec<OwnedFd>)>,
    /// The push RPC listener.
    pub(crate) rpc: Option<OwnedFd>,
    /// The admin listener.
    pub(crate) admin: Option<OwnedFd>,
    /// The predecessor's etcd lease, holding the node's key.
    pub(crate) lease: Option<i64>,
    /// Where to say "ready".
    ready: Option<OwnedFd>,
    /// Where the predecessor's presence notices arrive (`presence_gate`).
    pub(crate) presence: Option<OwnedFd>,
    /// Where the predecessor takes the pushes for ids this process does not hold, while
    /// it drains (`None`: an older predecessor that does not say).
    pub(crate) predecessor: Option<ForwardTarget>,
    from_predecessor: bool,
}

impl Inherited {
    /// Takes the inherited listeners of the client port named `name`.
    pub(crate) fn take_client(&mut self, name: &str) -> Vec<OwnedFd> {
        match self.client.iter().position(|(n, _)| n == name) {
            Some(i) => self.client.remove(i).1,
            None => Vec::new(),
        }
    }

    /// Reads the hand-over from the environment; empty when this is a fresh start.
    pub(crate) fn from_env() -> Result<Inherited, HandoverError> {
        match std::env::var(ENV) {
            Ok(value) if !value.is_empty() => Inherited::parse(&value),
            _ => Ok(Inherited::default()),
        }
    }

    fn parse(value: &str) -> Result<Inherited, HandoverError> {
        let mut inherited = Inherited {
            from_predecessor: true,
            ..Inherited::default()
        };
        for part in value.split(';').filter(|p| !p.is_empty()) {
            let (key, list) = part
                .split_once('=')
                .ok_or_else(|| HandoverError::Malformed(part.to_owned()))?;
            match key {
                "ws" | "tcp" | "wss" => {
                    let fds = list.split(',').map(adopt).collect::<Result<_, _>>()?;
                    inherited.client.push((key.to_owned(), fds));
                }
                "rpc" => inherited.rpc = Some(adopt(list)?),
                "admin" => inherited.admin = Some(adopt(list)?),
                "ready" => inherited.ready = Some(adopt(list)?),
                "presence" => inherited.presence = Some(adopt(list)?),
                "back" => inherited.predecessor = read_target(adopt(list)?),
                "lease" => {
                    let lease = i64::from_str_radix(list, 16)
                        .map_err(|_| HandoverError::Malformed(part.to_owned()))?;
                    inherited.lease = Some(lease);
                }
                _ => return Err(HandoverError::Malformed(part.to_owned())),
            }
        }
        Ok(inherited)
    }

    /// Whether this process was started by a predecessor.
    pub(crate) fn is_handover(&self) -> bool {
        self.from_predecessor
    }

    /// Tells the predecessor this process is serving (it then stops accepting), and where
    /// to forward the pushes for ids that have moved here.
    pub(crate) fn signal_ready(&mut self, forward: &ForwardTarget) {
        if let Some(fd) = self.ready.take() {
            let mut pipe = std::fs::File::from(fd);
            let mut message = b"R".to_vec();
            message.extend(forward.encode());
            let _ = pipe.write_all(&message);
        }
    }
}

/// Reads a [`ForwardTarget`] the predecessor wrote (and closed) before starting us.
fn read_target(pipe: OwnedFd) -> Option<ForwardTarget> {
    let mut said = Vec::new();
    let _ = std::fs::File::from(pipe)
        .take(MAX_READY_BYTES)
        .read_to_end(&mut said);
    ForwardTarget::decode(&said)
}

fn adopt(text: &str) -> Result<OwnedFd, HandoverError> {
    let fd: RawFd = text
        .parse()
        .map_err(|_| HandoverError::Malformed(text.to_owned()))?;
    // The predecessor passed this descriptor to us for us to own; it is used nowhere
    // else in this process.
    let owned = crate::sys::own_inherited_fd(fd);
    set_cloexec(owned.as_raw_fd(), true);
    Ok(owned)
}

/// A close-on-exec TCP listener on `addr`; `reuse_port` lets every shard bind one.
pub(crate) fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Checks an inherited descriptor is a TCP listener on `port`.
pub(crate) fn check_listener(fd: &OwnedFd, port: u16) -> Result<(), HandoverError> {
    let socket = socket2::SockRef::from(fd);
    let listening = socket.is_listener().unwrap_or(false);
    let local_port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port());
    if listening && local_port == Some(port) {
        Ok(())
    } else {
        Err(HandoverError::NotOurListener {
            fd: fd.as_raw_fd(),
            port,
        })
    }
}

/// Where one side of a hand-over takes the pushes the other forwards to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForwardTarget {
    /// Its peer listener (from an older successor: the shared RPC listener).
    pub(crate) addr: SocketAddr,
    /// That side's `comet_rpc_token` (the two may differ after a config change).
    pub(crate) token: String,
}

/// The most a successor may write after its `R` (a bound on what we read from the pipe).
const MAX_READY_BYTES: u64 = 64 * 1024;

impl ForwardTarget {
    /// The peer listener of one side of a hand-over: loopback, a port the kernel picks.
    pub(crate) fn bind_peer_listener() -> io::Result<(std::net::TcpListener, SocketAddr)> {
        let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        Ok((listener, addr))
    }

    /// The target for a node listening on `listen`: an unspecified address (0.0.0.0, ::)
    /// is reached on loopback.
    pub(crate) fn for_listener(listen: SocketAddr, token: &str) -> ForwardTarget {
        let mut addr = listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        ForwardTarget {
            addr,
            token: token.to_owned(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::json!({"rpc": self.addr.to_string(), "token": self.token})
            .to_string()
            .into_bytes()
    }

    /// What followed the `R`; `None` when nothing usable did (an older successor).
    fn decode(bytes: &[u8]) -> Option<ForwardTarget> {
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        Some(ForwardTarget {
            addr: value.get("rpc")?.as_str()?.parse().ok()?,
            token: value.get("token")?.as_str()?.to_owned(),
        })
    }
}

/// A successor that is serving.
pub(crate) struct Ready {
    /// The pipe to write presence notices to.
    pub(crate) notices: std::fs::File,
    /// Where it takes forwarded pushes (`None`: an older binary that does not say).
    pub(crate) forward: Option<ForwardTarget>,
}

/// The descriptors a running node hands over.
pub(crate) struct Handover {
    /// Client listeners (one per shard) by port name (`ws`, `tcp`, `wss`).
    pub(crate) client: Vec<(&'static str, Vec<RawFd>)>,
    /// The push RPC listener.
    pub(crate) rpc: RawFd,
    /// The admin listener.
    pub(crate) admin: Option<RawFd>,
    /// The etcd lease holding the node's key.
    pub(crate) lease: Option<i64>,
}

/// A started successor, the pipe it will say "ready" on, and the pipe this process
/// tells it about presence on.
pub(crate) struct Successor {
    /// Its process id.
    pub(crate) pid: u32,
    ready: std::fs::File,
    notices: std::fs::File,
}

impl Successor {
    /// Blocks until the successor is serving or has exited (`None`). Run it on a
    /// blocking thread, bounded by a timeout.
    pub(crate) fn wait_ready(self) -> Option<Ready> {
        let mut said = Vec::new();
        // The successor closes the pipe right after writing, so this reads to its end.
        let _ = (&self.ready)
            .take(1 + MAX_READY_BYTES)
            .read_to_end(&mut said);
        let rest = said.strip_prefix(b"R")?;
        Some(Ready {
            notices: self.notices,
            forward: ForwardTarget::decode(rest),
        })
    }
}

/// Waits for a successor that failed (or was killed) so that it leaves no zombie
/// behind; gives up after `limit` (the process then stays a zombie until we exit).
pub(crate) fn reap(pid: u32, limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(reaped) = crate::sys::try_reap(pid) {
            return reaped;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Handover {
    /// Starts the successor with the listeners inherited; it forwards to `back` the
    /// pushes for ids it does not hold while this process drains.
    pub(crate) fn spawn_successor(&self, back: &ForwardTarget) -> Result<Successor, HandoverError> {
        let (ready_read, ready_write) = pipe().map_err(HandoverError::Spawn)?;
        let (notices_read, notices_write) = pipe().map_err(HandoverError::Spawn)?;
        let (back_read, back_write) = pipe().map_err(HandoverError::Spawn)?;
        // A few dozen bytes: the pipe's buffer takes them before anyone reads.
        std::fs::File::from(back_write)
            .write_all(&back.encode())
            .map_err(HandoverError::Spawn)?;
        let mut inherited: Vec<RawFd> = self
            .client
            .iter()
            .flat_map(|(_, fds)| fds.clone())
            .collect();
        inherited.push(self.rpc);
        inherited.extend(self.admin);
        inherited.push(ready_write.as_raw_fd());
        inherited.push(notices_read.as_raw_fd());
        inherited.push(back_read.as_raw_fd());
        let mut value = format!(
            "rpc={};ready={};presence={};back={}",
            self.rpc,
            ready_write.as_raw_fd(),
            notices_read.as_raw_fd(),
            back_read.as_raw_fd()
        );
        for (name, fds) in &self.client {
            value.push_str(&format!(";{name}={}", join(fds)));
        }
        if let Some(admin) = self.admin {
            value.push_str(&format!(";admin={admin}"));
        }
        if let Some(lease) = self.lease {
            value.push_str(&format!(";lease={lease:x}"));
        }
        let mut args = std::env::args_os();
        let program = args.next().unwrap_or_default();
        let mut command = Command::new(program);
        command.args(args).env(ENV, value);
        crate::sys::keep_open_across_exec(&mut command, inherited);
        crate::sys::hold_stop_signals_across_exec(&mut command);
        let child = command.spawn().map_err(HandoverError::Spawn)?;
        drop(ready_write);
        drop(notices_read);
        drop(back_read);
        Ok(Successor {
            pid: child.id(),
            ready: std::fs::File::from(ready_read),
            notices: std::fs::File::from(notices_write),
        })
    }
}

fn join(fds: &[RawFd]) -> String {
    fds.iter()
        .map(RawFd::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    crate::sys::pipe_cloexec()
}

fn set_cloexec(fd: RawFd, on: bool) {
    crate::sys::set_cloexec(fd, on);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_handover_is_refused() {
        assert!(Inherited::parse("ws").is_err());
        assert!(Inherited::parse("colour=blue").is_err());
        assert!(Inherited::parse("lease=xyz").is_err());
        assert!(Inherited::parse("ws=notanumber").is_err());
    }

    #[test]
    fn the_back_pipe_names_the_predecessor_s_peer_listener() {
        use std::os::fd::IntoRawFd;
        let target = ForwardTarget::for_listener("127.0.0.1:9".parse().unwrap(), "tok");
        let (read, write) = pipe().unwrap();
        std::fs::File::from(write)
            .write_all(&target.encode())
            .unwrap();
        let inherited = Inherited::parse(&format!("back={}", read.into_raw_fd())).unwrap();
        assert_eq!(inherited.predecessor, Some(target));
        // Garbage in the pipe: no predecessor to forward to, not a failed start.
        let (read, write) = pipe().unwrap();
        std::fs::File::from(write).write_all(b"\x1b[2J").unwrap();
        let inherited = Inherited::parse(&format!("back={}", read.into_raw_fd())).unwrap();
        assert_eq!(inherited.predecessor, None);
    }

    #[test]
    fn a_bound_listener_passes_the_check_and_a_wrong_port_does_not() {
        let fd = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let port = socket2::SockRef::from(&fd)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap()
            .port();
        assert!(check_listener(&fd, port).is_ok());
        assert!(check_listener(&fd, port.wrapping_add(1)).is_err());
    }

    #[test]
    fn the_forward_target_survives_the_pipe_and_garbage_reads_as_none() {
        let target = ForwardTarget::for_listener("0.0.0.0:8902".parse().unwrap(), "s\"e\ncret");
        assert_eq!(target.addr, "127.0.0.1:8902".parse().unwrap());
        assert_eq!(ForwardTarget::decode(&target.encode()), Some(target));
        assert_eq!(ForwardTarget::decode(b""), None);
        assert_eq!(
            ForwardTarget::decode(b"{\"rpc\":\"nowhere\",\"token\":\"\"}"),
            None
        );
        let v6 = ForwardTarget::for_listener("[::]:9".parse().unwrap(), "");
        assert_eq!(v6.addr, "[::1]:9".parse().unwrap());
    }
}
