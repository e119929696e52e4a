//! A minimal WebSocket client for load generation: the upgrade with the token in `t`,
//! reading server frames, answering pings. Small buffers: a worker holds ~10k of these.
//!
//! With `deflate` it offers `permessage-deflate` (RFC 7692) and, when the server accepts
//! with `server_no_context_takeover` (Comet always does), inflates frames with RSV1 set:
//! each message is a raw deflate stream on its own, so one inflater per thread, reset per
//! message, serves every connection (no 32 KB window per client).

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};

use flate2::{Decompress, FlushDecompress, Status};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// An upgraded client connection.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    filled: usize,
    /// permessage-deflate was negotiated: frames with RSV1 are inflated.
    deflate: bool,
    /// Bytes read from the socket since the last [`Client::take_read_bytes`].
    read_bytes: u64,
}

/// The largest message inflated (a bound, not a figure: Comet's pushes are far smaller).
const MAX_INFLATED: usize = 16 << 20;

thread_local! {
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Inflates one permessage-deflate message: the raw deflate stream with `00 00 ff ff`
/// appended (RFC 7692 section 7.2.2), on a fresh window.
pub fn inflate(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut input = Vec::with_capacity(payload.len() + 4);
    input.extend_from_slice(payload);
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    INFLATER.with(|cell| {
        let mut inflater = cell.borrow_mut();
        inflater.reset(false);
        let mut out = Vec::with_capacity(payload.len() * 8 + 64);
        loop {
            let (consumed, produced) = (inflater.total_in() as usize, out.len());
            let status = inflater
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let done = inflater.total_in() as usize == input.len();
            if status == Status::StreamEnd || (done && out.len() < out.capacity()) {
                return Ok(out);
            }
            if out.len() >= MAX_INFLATED {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "inflated message too large",
                ));
            }
            let stuck = inflater.total_in() as usize == consumed && out.len() == produced;
            if stuck && out.len() < out.capacity() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "deflate stream stuck",
                ));
            }
            out.reserve(out.capacity().max(4096));
        }
    })
}

/// A frame from the server.
pub enum Frame {
    /// A text or binary message.
    Message(Vec<u8>),
    /// The server closed.
    Close,
}

/// Connects from `source` to `server` and upgrades on `path_and_query`; with `deflate` it
/// offers permessage-deflate (see [`Client::deflate`] for what the server answered).
pub async fn connect(
    source: IpAddr,
    server: SocketAddr,
    path_and_query: &str,
    deflate: bool,
) -> std::io::Result<Client> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Let connect() pick the source port knowing the destination: with a bare bind the
    // port must be unique per source address, and tens of thousands of TIME_WAIT sockets
    // left by a churn phase make that search slow.
    let yes: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&yes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(SocketAddr::new(source, 0))?;
    let mut stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 256];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed during the upgrade"));
        }
        head.extend_from_slice(&byte[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 101") {
                let status = String::from_utf8_lossy(&head[..head.len().min(40)]).into_owned();
                return Err(std::io::Error::other(format!("upgrade refused: {status}")));
            }
            let accepted = deflate && accepts_deflate(&head[..end])?;
            let rest = head[end + 4..].to_vec();
            let mut buf = vec![0u8; 512.max(rest.len())];
            buf[..rest.len()].copy_from_slice(&rest);
            return Ok(Client {
                stream,
                filled: rest.len(),
                buf,
                deflate: accepted,
                read_bytes: head.len() as u64,
            });
        }
    }
}

/// Whether the `101` head accepts permessage-deflate. An answer this client cannot read
/// (context takeover kept by the server: a window per connection) is an error.
fn accepts_deflate(head: &[u8]) -> std::io::Result<bool> {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let Some(value) = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim() == "sec-websocket-extensions")
        .map(|(_, value)| value.trim().to_owned())
    else {
        return Ok(false);
    };
    let params: Vec<&str> = value.split(';').map(str::trim).collect();
    if params.first() != Some(&"permessage-deflate") {
        return Err(std::io::Error::other(format!(
            "unexpected extension answer: {value}"
        )));
    }
    if !params.contains(&"server_no_context_takeover") {
        return Err(std::io::Error::other(format!(
            "permessage-deflate without server_no_context_takeover: {value}"
        )));
    }
    Ok(true)
}

impl Client {
    /// Whether permessage-deflate was negotiated.
    pub fn deflate(&self) -> bool {
        self.deflate
    }

    /// Bytes read from the socket (upgrade answer included) since the last call.
    pub fn take_read_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.read_bytes)
    }

    /// The next message, inflated if it came compressed; pings are answered on the way.
    pub async fn next(&mut self) -> std::io::Result<Frame> {
        loop {
            if let Some((first, payload, used)) = self.parse() {
                self.buf.copy_within(used..self.filled, 0);
                self.filled -= used;
                let opcode = first & 0x0F;
                let compressed = first & 0x40 != 0;
                if compressed && !(self.deflate && (0x1..=0x2).contains(&opcode)) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "RSV1 on a frame that cannot be compressed",
                    ));
                }
                match opcode {
                    0x1..=0x2 if compressed => return Ok(Frame::Message(inflate(&payload)?)),
                    0x0..=0x2 => return Ok(Frame::Message(payload)),
                    0x8 => return Ok(Frame::Close),
                    0x9 => self.send(0xA, &payload).await?,
                    _ => {}
                }
                continue;
            }
            if self.filled == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.stream.read(&mut self.buf[self.filled..]).await?;
            if n == 0 {
                return Ok(Frame::Close);
            }
            self.filled += n;
            self.read_bytes += n as u64;
        }
    }

    fn parse(&self) -> Option<(u8, Vec<u8>, usize)> {
        let data = &self.buf[..self.filled];
        if data.len() < 2 {
            return None;
        }
        let first = data[0];
        let (len, header) = match data[1] & 0x7F {
            126 if data.len() >= 4 => (u16::from_be_bytes([data[2], data[3]]) as usize, 4),
            127 if data.len() >= 10 => (
                u64::from_be_bytes(data[2..10].try_into().ok()?) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if data.len() < header + len {
            return None;
        }
        Some((first, data[header..header + len].to_vec(), header + len))
    }

    /// Sends a masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.stream.write_all(&frame).await
    }

    /// Closes politely (close frame) and drops the socket.
    pub async fn close(mut self) {
        let _ = self.send(0x8, &1000u16.to_be_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use flate2::{Compress, Compression, FlushCompress};

    /// What Comet sends: raw deflate of one message, sync flush, `00 00 ff ff` removed.
    fn deflate(message: &[u8]) -> Vec<u8> {
        let mut compress = Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(message.len() + 64);
        compress
            .compress_vec(message, &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    #[test]
    fn inflates_what_comet_sends() {
        for seq in [0, 1, u64::MAX] {
            let message = crate::clock::stamped_json(2048, seq);
            let compressed = deflate(message.as_bytes());
            assert!(compressed.len() * 3 < message.len(), "{}", compressed.len());
            assert_eq!(super::inflate(&compressed).unwrap(), message.as_bytes());
        }
        // A message far larger than the first output guess.
        let big = "a".repeat(1 << 20);
        assert_eq!(
            super::inflate(&deflate(big.as_bytes())).unwrap(),
            big.as_bytes()
        );
        assert!(super::inflate(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn stamped_json_carries_time_and_seq() {
        let message = crate::clock::stamped_json(2048, 7);
        assert!((2048..2400).contains(&message.len()), "{}", message.len());
        assert!(serde_json::from_str::<serde_json::Value>(&message).is_ok());
        assert!(crate::clock::publish_ns(message.as_bytes()).is_some());
        assert_eq!(crate::worker::sequence(message.as_bytes()), Some(7));
    }
}
