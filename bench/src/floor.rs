//! The floor: the least work a gateway can do on Comet's wire contract, so that every
//! figure of `comet-bench compare` can be read as a ratio to it (issue 12).
//!
//! One thread. A client's upgrade is handled blocking, start to end, the moment it is
//! accepted (read the request, verify the signed token of `t`, write the 101), and then
//! its socket goes into a map from conn_id to socket. A push (`Server.SendToConnections`,
//! `Server.Broadcast` on a JSON-lines push RPC, replies as Comet's) encodes the
//! WebSocket frame once and does one `send(2)` per recipient with `MSG_DONTWAIT`: nothing
//! is queued (a full socket buffer is a failed id), nothing is retried.
//!
//! The only thing polled is the two listeners and the push RPC connections (one `poll(2)`
//! over them); a client's socket is never read or polled. What that skips, on purpose:
//! - no pings are sent and nothing a client sends is read (pongs, client messages and
//!   Close frames sit in the kernel's buffer), so no heartbeat closes anybody;
//! - a client that went away is noticed only when a send to it fails (then it leaves the
//!   map); until then its descriptor is kept (the compare mode runs no churn phase);
//! - the token's header is not parsed (only HS256 tokens are sent), `nbf`/`iat` are not
//!   checked, nothing is logged, there are no presence callbacks, no etcd.
//!
//! It must never be used as a gateway: it is a measuring stick.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha1::Digest;
use sha2::Sha256;

/// Bytes of an upgrade request the floor reads at most.
const MAX_REQUEST: usize = 8 * 1024;
/// Bytes of unanswered push RPC input one connection may hold.
const MAX_RPC_BUFFER: usize = 1 << 20;

/// A push RPC call, borrowed from the line it came in.
#[derive(Deserialize)]
struct Call<'a> {
    #[serde(borrow)]
    method: &'a str,
    #[serde(borrow)]
    params: Vec<Params<'a>>,
    id: serde_json::Value,
}

#[derive(Deserialize, Default)]
struct Params<'a> {
    #[serde(default, borrow)]
    connections: Vec<&'a str>,
    #[serde(default, borrow)]
    msg: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenObject {
    conn_id: String,
    token: String,
}

struct RpcConn {
    stream: TcpStream,
    input: Vec<u8>,
}

/// Serves until killed: clients on `ws`, the push RPC on `rpc`.
pub fn serve(ws: TcpListener, rpc: TcpListener, secret: &str) -> anyhow::Result<()> {
    ws.set_nonblocking(true)?;
    rpc.set_nonblocking(true)?;
    let mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    let mut clients: HashMap<String, TcpStream> = HashMap::new();
    let mut conns: Vec<RpcConn> = Vec::new();
    // One read buffer for every push connection (zeroing 64 KiB per read showed as 1.3%
    // of the floor's CPU in a profile of unicast (a)).
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut fds: Vec<libc::pollfd> = [ws.as_raw_fd(), rpc.as_raw_fd()]
            .into_iter()
            .chain(conns.iter().map(|c| c.stream.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live, correctly sized array of pollfd.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            accept_clients(&ws, &mac, &mut clients);
        }
        if fds[1].revents != 0 {
            while let Ok((stream, _)) = rpc.accept() {
                let _ = stream.set_nodelay(true);
                let _ = stream.set_nonblocking(true);
                conns.push(RpcConn {
                    stream,
                    input: Vec::new(),
                });
            }
        }
        let mut closed = Vec::new();
        for (i, pfd) in fds[2..].iter().enumerate() {
            if pfd.revents != 0 && !serve_rpc(&mut conns[i], &mut clients, &mut chunk) {
                closed.push(i);
            }
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
    }
}

fn accept_clients(ws: &TcpListener, mac: &Hmac<Sha256>, clients: &mut HashMap<String, TcpStream>) {
    while let Ok((stream, _)) = ws.accept() {
        if let Some((conn_id, stream)) = handshake(stream, mac) {
            clients.insert(conn_id, stream);
        }
    }
}

/// The blocking upgrade: the request, the token check, the 101. `None` closes it.
fn handshake(mut stream: TcpStream, mac: &Hmac<Sha256>) -> Option<(String, TcpStream)> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.set_nodelay(true).ok()?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = std::str::from_utf8(&head).ok()?;
    let Some(((conn_id, _), key)) = upgrade_target(text).filter(|(ids, _)| verify(mac, ids)) else {
        let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
        return None;
    };
    let accept = STANDARD.encode(sha1::Sha1::digest(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(reply.as_bytes()).ok()?;
    Some((conn_id, stream))
}

/// ((conn_id, token), Sec-WebSocket-Key) of an upgrade request with `t` in its query.
fn upgrade_target(request: &str) -> Option<((String, String), String)> {
    let target = request.lines().next()?.split(' ').nth(1)?;
    let query = target.split_once('?')?.1;
    let t = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("t="))
        .and_then(percent_decode)?;
    let object: TokenObject = serde_json::from_str(&t).ok()?;
    let key = request.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    })?;
    Some(((object.conn_id, object.token), key))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The HS256 signature, `sub` == conn_id, and `exp` in the future.
fn verify(mac: &Hmac<Sha256>, conn_and_token: &(String, String)) -> bool {
    let (conn_id, token) = conn_and_token;
    let Some((input, signature)) = token.rsplit_once('.') else {
        return false;
    };
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return false;
    };
    let mut mac = mac.clone();
    mac.update(input.as_bytes());
    if mac.verify_slice(&signature).is_err() {
        return false;
    }
    let claims = input
        .split_once('.')
        .and_then(|(_, payload)| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|json| serde_json::from_slice::<Claims>(&json).ok());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    claims.is_some_and(|c| c.sub == *conn_id && c.exp > now)
}

/// Reads what arrived on a push RPC connection and answers every complete line, all the
/// replies of one read in one write. `false`: the connection is gone.
fn serve_rpc(
    conn: &mut RpcConn,
    clients: &mut HashMap<String, TcpStream>,
    chunk: &mut [u8],
) -> bool {
    let mut open = true;
    loop {
        match conn.stream.read(chunk) {
            Ok(0) => {
                open = false;
                break;
            }
            Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
        if conn.input.len() > MAX_RPC_BUFFER {
            return false;
        }
    }
    let mut replies = Vec::new();
    let mut start = 0;
    while let Some(end) = conn.input[start..].iter().position(|b| *b == b'\n') {
        let line = &conn.input[start..start + end];
        start += end + 1;
        if !line.iter().all(u8::is_ascii_whitespace) {
            answer(line, clients, &mut replies);
        }
    }
    conn.input.drain(..start);
    if !replies.is_empty() {
        let _ = conn.stream.set_nonblocking(false);
        let written = conn.stream.write_all(&replies).is_ok();
        let _ = conn.stream.set_nonblocking(true);
        open &= written;
    }
    open
}

fn answer(line: &[u8], clients: &mut HashMap<String, TcpStream>, replies: &mut Vec<u8>) {
    let Ok(call) = serde_json::from_slice::<Call<'_>>(line) else {
        replies.extend_from_slice(b"{\"id\":null,\"result\":null,\"error\":\"invalid JSON\"}\n");
        return;
    };
    let params = call.params.into_iter().next().unwrap_or_default();
    let frame = text_frame(params.msg.as_bytes());
    let id = &call.id;
    match call.method.trim_start_matches("Server.") {
        "SendToConnections" => {
            let failed: Vec<&str> = params
                .connections
                .iter()
                .copied()
                .filter(|to| !send_to(clients, to, &frame))
                .collect();
            if failed.is_empty() {
                let _ = writeln!(replies, "{{\"id\":{id},\"result\":\"ok\",\"error\":null}}");
            } else {
                let error = serde_json::json!({"ids": failed, "msg": "not connected"}).to_string();
                let _ = writeln!(
                    replies,
                    "{{\"id\":{id},\"result\":null,\"error\":{}}}",
                    serde_json::Value::String(error)
                );
            }
        }
        "Broadcast" => {
            let mut gone = Vec::new();
            let mut delivered = 0u64;
            for (conn_id, stream) in clients.iter() {
                match send_once(stream, &frame) {
                    Sent::Yes => delivered += 1,
                    Sent::Full => {}
                    Sent::Gone => gone.push(conn_id.clone()),
                }
            }
            let code = if gone.is_empty() { 20000 } else { 50001 };
            for conn_id in &gone {
                clients.remove(conn_id);
            }
            let result = serde_json::json!({"code": code, "data": {"delivered": delivered, "failed": gone}, "error": ""});
            let _ = writeln!(
                replies,
                "{{\"id\":{id},\"result\":{result},\"error\":null}}"
            );
        }
        other => {
            let _ = writeln!(
                replies,
                "{{\"id\":{id},\"result\":null,\"error\":{}}}",
                serde_json::Value::String(format!("rpc: can't find method {other}"))
            );
        }
    }
}

enum Sent {
    Yes,
    Full,
    Gone,
}

/// One `send(2)`, never waiting: a socket whose buffer is full gets nothing.
fn send_once(stream: &TcpStream, frame: &[u8]) -> Sent {
    // SAFETY: a live socket and a live buffer of that length.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n == frame.len() as isize {
        return Sent::Yes;
    }
    match std::io::Error::last_os_error().kind() {
        ErrorKind::WouldBlock | ErrorKind::Interrupted => Sent::Full,
        _ if n >= 0 => Sent::Full,
        _ => Sent::Gone,
    }
}

/// Sends to one conn_id; a client that is gone leaves the map.
fn send_to(clients: &mut HashMap<String, TcpStream>, conn_id: &str, frame: &[u8]) -> bool {
    let Some(stream) = clients.get(conn_id) else {
        return false;
    };
    match send_once(stream, frame) {
        Sent::Yes => true,
        Sent::Full => false,
        Sent::Gone => {
            clients.remove(conn_id);
            false
        }
    }
}

/// An unmasked, final Text frame.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x81);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n < 65536 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_target_is_read_from_t() {
        let path = crate::token::ws_path("a b", "tok", false);
        let request = format!("GET {path} HTTP/1.1\r\nSec-WebSocket-Key: k==\r\n\r\n");
        let ((conn_id, token), key) = upgrade_target(&request).expect("parsed");
        assert_eq!(
            (conn_id.as_str(), token.as_str(), key.as_str()),
            ("a b", "tok", "k==")
        );
    }

    #[test]
    fn a_signed_token_passes_and_a_foreign_one_does_not() {
        let mac = Hmac::<Sha256>::new_from_slice(b"s").expect("key");
        let good = ("c1".to_owned(), crate::token::sign("s", "c1"));
        let other_id = ("c2".to_owned(), crate::token::sign("s", "c1"));
        let other_key = ("c1".to_owned(), crate::token::sign("x", "c1"));
        assert!(verify(&mac, &good));
        assert!(!verify(&mac, &other_id));
        assert!(!verify(&mac, &other_key));
    }

    #[test]
    fn frames_carry_the_length_in_the_right_form() {
        assert_eq!(text_frame(b"hi"), b"\x81\x02hi");
        assert_eq!(&text_frame(&[b'x'; 200])[..4], &[0x81, 126, 0, 200]);
    }
}
