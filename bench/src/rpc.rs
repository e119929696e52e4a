//! The push side of a server under test: Comet's and the floor's push RPC (one JSON-RPC
//! call per line over TCP), or the same call as the body of an HTTP/1.1 POST (the Bun
//! peer, whose pub/sub is driven over HTTP). Replies come back in order on a connection
//! in both wires, so a caller matches them by position, not by id.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// How push calls travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// A JSON object per line (Comet, the floor).
    Lines,
    /// An HTTP POST per call, keep-alive unless said otherwise (the Bun peer).
    Http,
}

/// The bytes of one call: `method(param)` with `id`. HTTP requests never ask for
/// `Connection: close`: a caller that is done closes first, as with the line wire, so the
/// TIME_WAIT stays on the caller's side (a server-side TIME_WAIT met by a reused port
/// costs a 1 s SYN retransmission: p99 1.7 s for Bun in a first run).
pub fn encode(wire: Wire, method: &str, param: &Value, id: u64) -> Vec<u8> {
    let body = json!({"method": method, "params": [param], "id": id}).to_string();
    match wire {
        Wire::Lines => format!("{body}\n").into_bytes(),
        Wire::Http => format!(
            "POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    }
}

/// The next reply's body; `None` when the connection closed.
pub fn read_reply(
    reader: &mut BufReader<TcpStream>,
    wire: Wire,
) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    if wire == Wire::Lines {
        return Ok(Some(line));
    }
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Some(String::from_utf8_lossy(&body).into_owned()))
}

/// Whether a reply body says the push went through (`"result":"ok"`).
pub fn is_ok(reply: &str) -> bool {
    reply.contains("\"ok\"")
}

/// A blocking push client, one call at a time.
pub struct Rpc {
    wire: Wire,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    id: u64,
}

impl Rpc {
    pub fn connect(addr: SocketAddr, wire: Wire) -> anyhow::Result<Rpc> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Rpc {
            wire,
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            id: 0,
        })
    }

    pub fn call(&mut self, method: &str, param: Value) -> anyhow::Result<Value> {
        self.id += 1;
        self.writer
            .write_all(&encode(self.wire, method, &param, self.id))?;
        let Some(reply) = read_reply(&mut self.reader, self.wire)? else {
            bail!("the server closed the push connection");
        };
        serde_json::from_str(&reply).with_context(|| format!("reply {reply:?}"))
    }
}
