//! A minimal WebSocket client for load generation: the upgrade with the token in `t`,
//! reading server frames, answering pings. Small buffers: a worker holds ~10k of these.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// An upgraded client connection.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

/// A frame from the server.
pub enum Frame {
    /// A text or binary message.
    Message(Vec<u8>),
    /// The server closed.
    Close,
}

/// Connects from `source` to `server` and upgrades on `path_and_query`.
pub async fn connect(
    source: IpAddr,
    server: SocketAddr,
    path_and_query: &str,
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
    let request = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
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
            let rest = head[end + 4..].to_vec();
            let mut buf = vec![0u8; 512.max(rest.len())];
            buf[..rest.len()].copy_from_slice(&rest);
            return Ok(Client {
                stream,
                filled: rest.len(),
                buf,
            });
        }
    }
}

impl Client {
    /// The next message; pings are answered on the way.
    pub async fn next(&mut self) -> std::io::Result<Frame> {
        loop {
            if let Some((opcode, payload, used)) = self.parse() {
                self.buf.copy_within(used..self.filled, 0);
                self.filled -= used;
                match opcode {
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
        }
    }

    fn parse(&self) -> Option<(u8, Vec<u8>, usize)> {
        let data = &self.buf[..self.filled];
        if data.len() < 2 {
            return None;
        }
        let opcode = data[0] & 0x0F;
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
        Some((opcode, data[header..header + len].to_vec(), header + len))
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
