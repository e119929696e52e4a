//! RESP, the Redis serialization protocol: decoding the commands a stock Redis client
//! sends (multibulk arrays, and inline commands as typed into `nc`), and encoding the
//! replies and pub/sub messages it expects, in RESP2 or RESP3.
//!
//! Pure bytes in, bytes out; no I/O. A command is bounded by [`MAX_COMMAND_BYTES`] and
//! [`MAX_ARGS`]: a client announcing more (`*99999999`) is refused before anything is
//! allocated for it.

/// Largest command accepted, all arguments and framing included.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 64;

/// Why a client's bytes are not RESP; the client gets `-ERR Protocol error: ...` and is
/// closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("invalid multibulk length")]
    MultibulkLength,
    #[error("invalid bulk length")]
    BulkLength,
    #[error("expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("command larger than {MAX_COMMAND_BYTES} bytes")]
    TooLarge,
    #[error("unbalanced quotes in inline command")]
    Unbalanced,
}

/// One command: its arguments, the first being the command name.
pub type Command = Vec<Vec<u8>>;

/// Accumulates a client's bytes and yields whole commands.
#[derive(Debug, Default)]
pub struct CommandDecoder {
    buffered: Vec<u8>,
}

impl CommandDecoder {
    /// Adds bytes read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffered.extend_from_slice(bytes);
    }

    /// The next complete command, `Ok(None)` when more bytes are needed.
    pub fn next_command(&mut self) -> Result<Option<Command>, RespError> {
        loop {
            let parsed = match self.buffered.first() {
                None => return Ok(None),
                Some(b'*') => parse_multibulk(&self.buffered)?,
                Some(_) => parse_inline(&self.buffered)?,
            };
            match parsed {
                Some((command, used)) => {
                    self.buffered.drain(..used);
                    if self.buffered.is_empty() && self.buffered.capacity() > 1024 {
                        self.buffered = Vec::new();
                    }
                    // Redis skips empty inline lines (a bare Enter in a terminal).
                    if !command.is_empty() {
                        return Ok(Some(command));
                    }
                }
                None if self.buffered.len() > MAX_COMMAND_BYTES => {
                    return Err(RespError::TooLarge);
                }
                None => return Ok(None),
            }
        }
    }
}

/// Reads `<digits>\r\n` at `at`; `Ok(None)` when the line is not complete yet.
fn number_line(buf: &[u8], at: usize, bad: RespError) -> Result<Option<(i64, usize)>, RespError> {
    let Some(rel) = buf[at..].iter().position(|&b| b == b'\r') else {
        // A number line is short; anything longer without its CR is not a number.
        return if buf.len() - at > 20 {
            Err(bad)
        } else {
            Ok(None)
        };
    };
    let end = at + rel;
    if end + 1 >= buf.len() {
        return Ok(None);
    }
    if buf[end + 1] != b'\n' {
        return Err(bad);
    }
    let text = std::str::from_utf8(&buf[at..end]).map_err(|_| bad.clone())?;
    let value = text.parse::<i64>().map_err(|_| bad)?;
    Ok(Some((value, end + 2)))
}

fn parse_multibulk(buf: &[u8]) -> Result<Option<(Command, usize)>, RespError> {
    let Some((count, mut at)) = number_line(buf, 1, RespError::MultibulkLength)? else {
        return Ok(None);
    };
    if count > MAX_ARGS as i64 {
        return Err(RespError::MultibulkLength);
    }
    let count = count.max(0) as usize;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let Some(&marker) = buf.get(at) else {
            return Ok(None);
        };
        if marker != b'$' {
            return Err(RespError::ExpectedBulk(marker as char));
        }
        let Some((len, start)) = number_line(buf, at + 1, RespError::BulkLength)? else {
            return Ok(None);
        };
        if !(0..=MAX_COMMAND_BYTES as i64).contains(&len) {
            return Err(RespError::BulkLength);
        }
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(RespError::MissingCrlf);
        }
        args.push(buf[start..end].to_vec());
        at = end + 2;
    }
    Ok(Some((args, at)))
}

fn parse_inline(buf: &[u8]) -> Result<Option<(Command, usize)>, RespError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Ok(Some((split_inline(line)?, end + 1)))
}

/// Splits an inline command on whitespace; `"..."` groups words (no escapes).
fn split_inline(line: &[u8]) -> Result<Command, RespError> {
    let mut args = Vec::new();
    let mut rest = line;
    loop {
        while let [first, tail @ ..] = rest {
            if !first.is_ascii_whitespace() {
                break;
            }
            rest = tail;
        }
        match rest.first() {
            None => return Ok(args),
            Some(b'"') => {
                let close = rest[1..]
                    .iter()
                    .position(|&b| b == b'"')
                    .ok_or(RespError::Unbalanced)?;
                args.push(rest[1..1 + close].to_vec());
                rest = &rest[close + 2..];
            }
            Some(_) => {
                let end = rest
                    .iter()
                    .position(u8::is_ascii_whitespace)
                    .unwrap_or(rest.len());
                args.push(rest[..end].to_vec());
                rest = &rest[end..];
            }
        }
        if args.len() > MAX_ARGS {
            return Err(RespError::MultibulkLength);
        }
    }
}

/// `+text\r\n`.
pub fn simple(text: &str) -> Vec<u8> {
    format!("+{text}\r\n").into_bytes()
}

/// `-text\r\n` (`text` starts with the error kind, e.g. `ERR`); line breaks are flattened.
pub fn error(text: &str) -> Vec<u8> {
    let flat: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    format!("-{flat}\r\n").into_bytes()
}

/// `:n\r\n`.
pub fn integer(n: i64) -> Vec<u8> {
    format!(":{n}\r\n").into_bytes()
}

/// `$len\r\nbytes\r\n`.
pub fn bulk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

/// The header of an aggregate of `len` elements: an array in RESP2, a push frame (for
/// out-of-band pub/sub data) in RESP3.
pub fn aggregate(len: usize, resp3_push: bool) -> Vec<u8> {
    let marker = if resp3_push { '>' } else { '*' };
    format!("{marker}{len}\r\n").into_bytes()
}

/// The pub/sub reply announcing `kind` (`subscribe`, `unsubscribe`, ...) for `channel`
/// with the connection's subscription count.
pub fn subscription(kind: &str, channel: &[u8], count: usize, resp3: bool) -> Vec<u8> {
    let mut out = aggregate(3, resp3);
    out.extend(bulk(kind.as_bytes()));
    out.extend(bulk(channel));
    out.extend(integer(count as i64));
    out
}

/// Everything of a pub/sub message before its payload: the RESP2 `message` array (or
/// `pmessage` for a pattern subscription) or the RESP3 push frame, naming `channel`.
/// The payload's bulk string is shared by all recipients (see `Message::encoded`).
pub fn message_prefix(channel: &[u8], pattern: bool, resp3: bool) -> Vec<u8> {
    let mut out = aggregate(if pattern { 4 } else { 3 }, resp3);
    if pattern {
        out.extend(bulk(b"pmessage"));
        out.extend(bulk(channel));
    } else {
        out.extend(bulk(b"message"));
    }
    out.extend(bulk(channel));
    out
}

/// The answer to `PING [text]`: in RESP2 subscriber mode Redis answers with a
/// `pong` array instead of a status.
pub fn pong(text: Option<&[u8]>, subscribed: bool, resp3: bool) -> Vec<u8> {
    match (subscribed && !resp3, text) {
        (true, text) => {
            let mut out = aggregate(2, false);
            out.extend(bulk(b"pong"));
            out.extend(bulk(text.unwrap_or_default()));
            out
        }
        (false, Some(text)) => bulk(text),
        (false, None) => simple("PONG"),
    }
}

/// The answer to `HELLO`: server facts as a map (RESP3) or a flat array (RESP2).
pub fn hello(protocol: u8, client_id: u64, version: &str) -> Vec<u8> {
    let fields: [(&str, Vec<u8>); 7] = [
        ("server", bulk(b"comet")),
        ("version", bulk(version.as_bytes())),
        ("proto", integer(i64::from(protocol))),
        ("id", integer(client_id as i64)),
        ("mode", bulk(b"standalone")),
        ("role", bulk(b"master")),
        ("modules", aggregate(0, false)),
    ];
    let mut out = if protocol == 3 {
        format!("%{}\r\n", fields.len()).into_bytes()
    } else {
        aggregate(fields.len() * 2, false)
    };
    for (name, value) in fields {
        out.extend(bulk(name.as_bytes()));
        out.extend(value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(bytes: &[u8]) -> Result<Vec<Command>, RespError> {
        let mut decoder = CommandDecoder::default();
        decoder.feed(bytes);
        let mut out = Vec::new();
        while let Some(command) = decoder.next_command()? {
            out.push(command);
        }
        Ok(out)
    }

    fn args(words: &[&str]) -> Command {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_commands_are_decoded_across_reads() {
        let wire = b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$3\r\nt 1\r\n*1\r\n$4\r\nPING\r\n";
        let mut decoder = CommandDecoder::default();
        let mut seen = Vec::new();
        for byte in wire {
            decoder.feed(&[*byte]);
            while let Some(command) = decoder.next_command().unwrap() {
                seen.push(command);
            }
        }
        assert_eq!(seen, vec![args(&["AUTH", "alice", "t 1"]), args(&["PING"])]);
    }

    #[test]
    fn inline_commands_split_on_spaces_and_quotes() {
        assert_eq!(
            commands(b"AUTH alice \"tok en\"\r\n\r\nping\n").unwrap(),
            vec![args(&["AUTH", "alice", "tok en"]), args(&["ping"])]
        );
        assert_eq!(commands(b"AUTH \"open\n"), Err(RespError::Unbalanced));
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        assert_eq!(commands(b"*99999999\r\n"), Err(RespError::MultibulkLength));
        assert_eq!(commands(b"*1\r\n$99999999\r\n"), Err(RespError::BulkLength));
        assert_eq!(commands(b"*1\r\n$-5\r\n"), Err(RespError::BulkLength));
        assert_eq!(commands(b"*x\r\n"), Err(RespError::MultibulkLength));
        assert_eq!(commands(b"*1\r\n:1\r\n"), Err(RespError::ExpectedBulk(':')));
        assert_eq!(commands(b"*1\r\n$1\r\nab\r\n"), Err(RespError::MissingCrlf));
        assert_eq!(
            commands(&[b'x'; MAX_COMMAND_BYTES + 1]),
            Err(RespError::TooLarge)
        );
        assert_eq!(
            commands(b"*1111111111111111111111111"),
            Err(RespError::MultibulkLength)
        );
    }

    #[test]
    fn replies_match_what_redis_sends() {
        assert_eq!(
            subscription("subscribe", b"news", 1, false),
            b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        );
        assert_eq!(
            message_prefix(b"news", false, true),
            b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n"
        );
        assert_eq!(pong(None, true, false), b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        assert_eq!(pong(None, false, false), b"+PONG\r\n");
        assert_eq!(pong(Some(b"x"), false, true), b"$1\r\nx\r\n");
        assert_eq!(error("ERR a\nb"), b"-ERR a b\r\n");
        assert!(hello(3, 7, "1.0").starts_with(b"%7\r\n$6\r\nserver\r\n$5\r\ncomet\r\n"));
        assert!(hello(2, 7, "1.0").starts_with(b"*14\r\n"));
    }
}
