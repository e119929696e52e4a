//! The few raw syscalls Comet makes itself: raising the open-files limit and the
//! non-blocking `send(2)` that lets a shard deliver a pushed frame without waking the
//! connection's task.
//!
//! Nothing here blocks: every socket call uses `MSG_DONTWAIT`.

use std::io;
use std::os::fd::RawFd;

/// The soft and hard open-files limits before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NofileLimits {
    /// Soft limit found at start.
    pub(crate) before: u64,
    /// Soft limit now (the hard limit unless raising failed).
    pub(crate) after: u64,
    /// Hard limit.
    pub(crate) hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every client is a descriptor.
pub(crate) fn raise_nofile_limit() -> io::Result<NofileLimits> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NofileLimits {
        before,
        after: limit.rlim_max,
        hard: limit.rlim_max,
    })
}

/// Writes as much of `parts` (in order, one `sendmsg(2)`) as the socket takes now; like
/// [`send_now`] for a message whose head and payload live in different buffers.
pub(crate) fn send_parts_now(fd: RawFd, parts: &[&[u8]; 2]) -> io::Result<usize> {
    if parts[1].is_empty() {
        return send_now(fd, parts[0]);
    }
    let mut iov = parts.map(|part| libc::iovec {
        iov_base: part.as_ptr().cast_mut().cast(),
        iov_len: part.len(),
    });
    // SAFETY: zeroed is a valid msghdr (no name, no control data).
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = iov.as_mut_ptr();
    header.msg_iovlen = iov.len();
    // SAFETY: the iovecs point into `parts`, valid for the call; `fd` is a socket owned
    // by the caller's stream; the kernel only reads through msg_iov.
    sent_now(|| unsafe { libc::sendmsg(fd, &header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) })
}

/// Writes as much of `bytes` as the socket takes now. `Ok(0)` with a non-empty slice
/// means the socket buffer is full (would block).
pub(crate) fn send_now(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is a valid slice for the duration of the call; `fd` is a socket
    // owned by the caller's stream, which outlives this call.
    sent_now(|| unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Runs a non-blocking send until it is not interrupted: bytes sent, 0 when the socket
/// buffer is full, or the error.
fn sent_now(mut send: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let sent = send();
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(err),
        }
    }
}

/// Resident set size of this process in bytes, from /proc/self/statm.
pub(crate) fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The memory page size in bytes.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    page.max(1) as u64
}

/// Clock ticks per second, the unit of CPU times in /proc (`USER_HZ`).
pub(crate) fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks.max(1) as u64
}

/// The soft `RLIMIT_NOFILE`: the most descriptors this process may hold.
pub(crate) fn nofile_soft_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// Descriptors this process holds now (a listing of `/proc/self/fd`, so not for a hot
/// path); `None` where that cannot be read.
pub(crate) fn open_descriptors() -> Option<usize> {
    let listed = std::fs::read_dir("/proc/self/fd").ok()?.count();
    // The listing's own descriptor is in it.
    Some(listed.saturating_sub(1))
}

/// Tells systemd (`Type=notify`) about this process, when started under it: `READY=1`
/// once serving, `MAINPID=` so that a successor started by a zero-downtime restart
/// becomes the unit's main process, `STOPPING=1` when draining. No-op elsewhere.
pub(crate) fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(err) = sent {
        tracing::warn!(error = %err, "could not notify systemd");
    }
}

/// Turns on TCP keepalive on a socket: probes after `idle` of silence, then every
/// `interval`, the connection dropped after `retries` unanswered. Data sent and not
/// acknowledged within `unacknowledged` (`TCP_USER_TIMEOUT`) drops it too: Linux sends no
/// keepalive probe while data is in flight, so an SSE client (written a `: ping` every
/// interval) or a RESP client pushed to, that vanished without a FIN, stayed online
/// through ~15 minutes of retransmissions, and its user's reconnect was refused as a
/// duplicate. `fd` must be an open socket for the whole call (the caller's connection).
pub(crate) fn set_keepalive(
    fd: RawFd,
    idle: std::time::Duration,
    interval: std::time::Duration,
    retries: u32,
    unacknowledged: std::time::Duration,
) {
    // SAFETY: the caller guarantees `fd` is open for the whole call; it is only borrowed.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(retries);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(unacknowledged));
}

/// A glommio listener that takes ownership of the listening socket `fd`. Each such
/// descriptor must be given to exactly one call (the shard that accepts on it), which
/// then closes it.
pub(crate) fn glommio_listener(fd: RawFd) -> glommio::net::TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller hands over sole ownership of an open listening socket.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd) }
}

/// Sends SIGKILL to a child we started; at worst it has already exited.
pub(crate) fn kill_child(pid: u32) {
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Reaps the child `pid` if it has exited: `Some(true)` reaped, `Some(false)` it is not
/// our child (or already reaped), `None` still running. Never blocks.
pub(crate) fn try_reap(pid: u32) -> Option<bool> {
    let mut status = 0;
    // SAFETY: waitpid writes the status into a local; WNOHANG never blocks.
    let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    if reaped == pid as libc::pid_t || reaped < 0 {
        Some(reaped > 0)
    } else {
        None
    }
}

/// Takes ownership of a descriptor number handed to this process by its predecessor.
/// The caller must be the only one to do so for this number.
pub(crate) fn own_inherited_fd(fd: RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller guarantees sole ownership of the inherited descriptor.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// A pipe whose ends close on exec.
pub(crate) fn pipe_cloexec() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Sets or clears close-on-exec on a descriptor number; a stale number fails harmlessly.
/// Async-signal-safe (fcntl only), so it may run between fork and exec.
pub(crate) fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor number has no memory preconditions.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

/// Makes `command`'s child inherit `fds` (cleared close-on-exec between fork and exec).
pub(crate) fn keep_open_across_exec(command: &mut std::process::Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl,
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            for fd in &fds {
                set_cloexec(*fd, false);
            }
            Ok(())
        });
    }
}

/// Makes `command`'s child start with the stop signals held, as [`hold_stop_signals`]
/// holds them from `main`'s first line: a SIGTERM between exec and `main` (the dynamic
/// loader; over 20 ms on a loaded machine) would otherwise kill a successor by the
/// default action. The child releases them once its handlers are installed.
pub(crate) fn hold_stop_signals_across_exec(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let set = stop_signals();
    // SAFETY: the closure runs in the child between fork and exec (after std reset the
    // signal mask) and only calls pthread_sigmask, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Peeks one byte of a socket without waiting: the byte count (0 at EOF) or -1 with
/// errno (EAGAIN when nothing is pending). Consumes nothing.
pub(crate) fn peek_byte(fd: RawFd) -> isize {
    let mut byte = 0u8;
    // SAFETY: a one-byte read into a local with MSG_PEEK; the caller's socket is open.
    unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    }
}

/// The signals that stop or restart a node (SIGTERM, SIGINT, SIGHUP, SIGUSR2).
fn stop_signals() -> libc::sigset_t {
    // SAFETY: `sigemptyset`/`sigaddset` only write the set they are given, a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2] {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks the stop signals in this thread, and so in every thread it starts from now on,
/// until [`release_stop_signals`]: one that arrives before the handlers are installed
/// stays pending instead of killing the process by its default action (a SIGTERM 20 ms
/// after start killed a LeakSanitizer build, slower to start, by signal 15).
pub(crate) fn hold_stop_signals() {
    let set = stop_signals();
    // SAFETY: changes this thread's signal mask only; `set` is a valid, initialised set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Unblocks the stop signals in this thread, once their handlers are installed: one
/// held pending since [`hold_stop_signals`] is delivered now, to the handler.
pub(crate) fn release_stop_signals() {
    let set = stop_signals();
    // SAFETY: as in `hold_stop_signals`.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_started_with_the_stop_signals_held_has_them_blocked() {
        let mut command = std::process::Command::new("grep");
        command.args(["SigBlk", "/proc/self/status"]);
        hold_stop_signals_across_exec(&mut command);
        let out = command.output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mask =
            u64::from_str_radix(text.trim().trim_start_matches("SigBlk:").trim(), 16).unwrap();
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2] {
            assert_ne!(mask & (1 << (signal - 1)), 0, "{signal} in {text}");
        }
    }
}
