//! RESP, the Redis serialization protocol: decoding the commands a stock Redis client
//! sends (multibulk arrays, and inline commands as typed into `nc`), and encoding the
//! replies and pub/sub messages it expects, in RESP2 or RESP3.
//!
//! Pure bytes in, bytes out; no I/O. A command is bounded by [`MAX_COMMAND_BYTES`] and
//! [`MAX_ARGS`]: a client announcing more (`*99999999`) is refused before anything is
//! allocated for it. The decoder holds at most one unfinished command (so at most
//! `MAX_COMMAND_BYTES` plus one read), and decoding is linear in the bytes received
//! however they are split or pipelined.

/// Largest command accepted, all arguments and framing included.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Most arguments in one command: a `SUBSCRIBE` of every channel a connection may hold
/// (a library resubscribing after a reconnect sends them all in one command).
pub const MAX_ARGS: usize = 1 + MAX_CHANNELS;
/// Most channels and patterns one connection may be subscribed to at once.
pub const MAX_CHANNELS: usize = 1024;
/// Most bytes of channel and pattern names one connection may hold at once: names are
/// kept for the session's life and counted against no other bound (1,024 names of 16 KiB
/// were 16 MiB per connection). 64 bytes per name for a full [`MAX_CHANNELS`].
pub const MAX_CHANNEL_BYTES: usize = 64 * 1024;
/// The Redis version Comet reports (`HELLO`, `INFO`): libraries gate features on it, and
/// Comet answers what they use on connect as Redis 7.0 does.
pub const REDIS_VERSION: &str = "7.0.0";

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
    // Bytes at the front of `buffered` already handed out as commands. Dropped at the
    // next `feed` rather than after each command: a read of thousands of pipelined
    // commands then costs one move of its tail, not one per command (quadratic).
    consumed: usize,
    // How far past `consumed` an inline command's `\n` was already looked for, so that
    // a long line trickled in byte by byte is scanned once.
    scanned: usize,
    // How much of an unfinished multibulk command was already checked, so that one sent
    // in small pieces is not parsed from its `*` again on every read: 1,024 arguments
    // trickled in were once ~15,000 re-parses and ~8M argument copies, on the shard,
    // before any AUTH.
    multibulk: Progress,
}

/// The part of an unfinished multibulk command already checked: its announced argument
/// count, how many arguments are complete, and where the next one starts (offsets from
/// the command's `*`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Progress {
    count: Option<usize>,
    args: usize,
    at: usize,
}

impl CommandDecoder {
    /// Adds bytes read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.consumed > 0 {
            self.buffered.drain(..self.consumed);
            self.consumed = 0;
        }
        if self.buffered.is_empty() && self.buffered.capacity() > 4 * MAX_COMMAND_BYTES {
            self.buffered = Vec::new();
        }
        self.buffered.extend_from_slice(bytes);
    }

    /// Bytes received and not yet decoded into a command.
    pub fn pending(&self) -> usize {
        self.buffered.len() - self.consumed
    }

    /// The next complete command, `Ok(None)` when more bytes are needed.
    pub fn next_command(&mut self) -> Result<Option<Command>, RespError> {
        loop {
            let rest = &self.buffered[self.consumed..];
            let parsed = match rest.first() {
                None => return Ok(None),
                Some(b'*') => match scan_multibulk(rest, &mut self.multibulk)? {
                    // Complete and checked: copying the arguments out is one pass.
                    Some(_) => parse_multibulk(rest)?,
                    None => None,
                },
                Some(_) => match rest[self.scanned.min(rest.len())..]
                    .iter()
                    .position(|&b| b == b'\n')
                {
                    Some(at) => Some(parse_inline(rest, self.scanned + at)?),
                    None => {
                        self.scanned = rest.len();
                        None
                    }
                },
            };
            match parsed {
                Some((_, used)) if used > MAX_COMMAND_BYTES => return Err(RespError::TooLarge),
                Some((command, used)) => {
                    self.consumed += used;
                    self.scanned = 0;
                    self.multibulk = Progress::default();
                    // Redis skips empty inline lines (a bare Enter in a terminal).
                    if !command.is_empty() {
                        return Ok(Some(command));
                    }
                }
                None if rest.len() > MAX_COMMAND_BYTES => {
                    return Err(RespError::TooLarge);
                }
                None => return Ok(None),
            }
        }
    }
}

/// Reads `<digits>\r\n` at `at`; `Ok(None)` when the line is not complete yet.
fn number_line(buf: &[u8], at: usize, bad: RespError) -> Result<Option<(i64, usize)>, RespError> {
    // A number line is short: look no further than its longest form (`-` and 19
    // digits), so that a header is never a scan of the whole buffer.
    let window = &buf[at..buf.len().min(at + 21)];
    let Some(rel) = window.iter().position(|&b| b == b'\r') else {
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

/// Checks the multibulk command at the front of `buf` from `progress` on, without
/// copying anything; returns its length once every argument has arrived. What an
/// earlier call found complete is not looked at again.
fn scan_multibulk(buf: &[u8], progress: &mut Progress) -> Result<Option<usize>, RespError> {
    let count = match progress.count {
        Some(count) => count,
        None => {
            let Some((count, at)) = multibulk_count(buf)? else {
                return Ok(None);
            };
            *progress = Progress {
                count: Some(count),
                args: 0,
                at,
            };
            count
        }
    };
    while progress.args < count {
        let Some((_, next)) = bulk_arg(buf, progress.at)? else {
            return Ok(None);
        };
        progress.args += 1;
        progress.at = next;
    }
    Ok(Some(progress.at))
}

/// The announced argument count of the multibulk command at the front of `buf`, and
/// where its first argument starts.
fn multibulk_count(buf: &[u8]) -> Result<Option<(usize, usize)>, RespError> {
    let Some((count, at)) = number_line(buf, 1, RespError::MultibulkLength)? else {
        return Ok(None);
    };
    if count > MAX_ARGS as i64 {
        return Err(RespError::MultibulkLength);
    }
    Ok(Some((count.max(0) as usize, at)))
}

/// The bulk string whose `$` is at `at`: the range of its bytes, and where the next
/// element starts; `Ok(None)` while it has not all arrived.
fn bulk_arg(buf: &[u8], at: usize) -> Result<Option<(std::ops::Range<usize>, usize)>, RespError> {
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
    Ok(Some((start..end, end + 2)))
}

fn parse_multibulk(buf: &[u8]) -> Result<Option<(Command, usize)>, RespError> {
    let Some((count, mut at)) = multibulk_count(buf)? else {
        return Ok(None);
    };
    // Announced is not received: reserve for a typical command only.
    let mut args = Vec::with_capacity(count.min(8));
    for _ in 0..count {
        let Some((bytes, next)) = bulk_arg(buf, at)? else {
            return Ok(None);
        };
        args.push(buf[bytes].to_vec());
        at = next;
    }
    Ok(Some((args, at)))
}

/// The inline command whose `\n` is at `end`.
fn parse_inline(buf: &[u8], end: usize) -> Result<(Command, usize), RespError> {
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Ok((split_inline(line)?, end + 1))
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

/// The null reply: `_` in RESP3, the null bulk string in RESP2.
pub fn null(resp3: bool) -> Vec<u8> {
    if resp3 {
        b"_\r\n".to_vec()
    } else {
        b"$-1\r\n".to_vec()
    }
}

/// The answer to `INFO [section ...]`: the `Server`, `Clients`, `Persistence` and
/// `Replication` sections, which is what libraries read on connect (ioredis's ready
/// check waits while `loading` is not `0`; others parse `redis_version` and `role`).
/// An unknown section is empty, as in Redis.
pub fn info(sections: &[Vec<u8>], comet_version: &str) -> Vec<u8> {
    let all: [(&str, String); 4] = [
        (
            "Server",
            format!(
                "redis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\n\
                 comet_version:{comet_version}\r\nos:{}\r\narch_bits:{}\r\n",
                std::env::consts::OS,
                usize::BITS
            ),
        ),
        ("Clients", "maxclients:0\r\n".to_owned()),
        (
            "Persistence",
            "loading:0\r\nasync_loading:0\r\nrdb_bgsave_in_progress:0\r\n".to_owned(),
        ),
        (
            "Replication",
            "role:master\r\nconnected_slaves:0\r\n".to_owned(),
        ),
    ];
    let wanted = |name: &str| {
        sections.is_empty()
            || sections.iter().any(|s| {
                s.eq_ignore_ascii_case(name.as_bytes())
                    || [&b"all"[..], b"default", b"everything"]
                        .iter()
                        .any(|every| s.eq_ignore_ascii_case(every))
            })
    };
    let mut text = String::new();
    for (name, body) in all.iter().filter(|(name, _)| wanted(name)) {
        if !text.is_empty() {
            text.push_str("\r\n");
        }
        text.push_str(&format!("# {name}\r\n{body}"));
    }
    bulk(text.as_bytes())
}

/// The answer to `HELLO`: server facts as a map (RESP3) or a flat array (RESP2). The
/// version is [`REDIS_VERSION`] (libraries compare it with Redis releases); Comet's own
/// is in `INFO`.
pub fn hello(protocol: u8, client_id: u64) -> Vec<u8> {
    let fields: [(&str, Vec<u8>); 7] = [
        ("server", bulk(b"comet")),
        ("version", bulk(REDIS_VERSION.as_bytes())),
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
        assert!(hello(3, 7).starts_with(b"%7\r\n$6\r\nserver\r\n$5\r\ncomet\r\n"));
        assert!(hello(2, 7).starts_with(b"*14\r\n"));
    }

    #[test]
    fn info_has_what_libraries_read_on_connect() {
        let all = String::from_utf8(info(&[], "9.9")).unwrap();
        assert!(all.starts_with('$'));
        for field in [
            "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n",
            "comet_version:9.9\r\n",
            "# Persistence\r\nloading:0\r\n",
            "role:master\r\n",
        ] {
            assert!(all.contains(field), "{field:?} in {all:?}");
        }
        let server = String::from_utf8(info(&[b"SERVER".to_vec()], "9.9")).unwrap();
        assert!(server.contains("redis_version") && !server.contains("loading"));
        assert_eq!(info(&[b"keyspace".to_vec()], "9.9"), b"$0\r\n\r\n");
        assert_eq!(info(&[b"everything".to_vec()], "9.9"), info(&[], "9.9"));
    }

    #[test]
    fn pipelined_commands_are_consumed_without_moving_the_buffer_each_time() {
        let mut wire = Vec::new();
        for _ in 0..2000 {
            wire.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        }
        wire.extend_from_slice(b"*2\r\n$4\r\nE");
        let mut decoder = CommandDecoder::default();
        decoder.feed(&wire);
        let mut n = 0;
        while decoder.next_command().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 2000);
        assert_eq!(decoder.pending(), 9);
        decoder.feed(b"CHO\r\n$2\r\nhi\r\n");
        assert_eq!(decoder.next_command().unwrap(), Some(args(&["ECHO", "hi"])));
        assert_eq!(decoder.pending(), 0);
    }

    #[test]
    fn a_trickled_multibulk_command_is_checked_once_and_resumed() {
        let names: Vec<String> = (0..MAX_CHANNELS).map(|i| format!("ch{i:05}")).collect();
        let mut words = vec!["SUBSCRIBE"];
        words.extend(names.iter().map(String::as_str));
        let wire = command_bytes(&words);
        let mut decoder = CommandDecoder::default();
        let mut seen = Vec::new();
        for (i, piece) in wire.chunks(3).enumerate() {
            decoder.feed(piece);
            while let Some(command) = decoder.next_command().unwrap() {
                seen.push(command);
            }
            let fed = (i + 1) * 3;
            if fed < wire.len() {
                // Where the next call resumes: every argument complete so far, and no
                // further back (each complete argument is checked once in all).
                let complete = complete_args(&wire[..fed]);
                assert_eq!(decoder.multibulk.args, complete, "after {fed} bytes");
            }
        }
        assert_eq!(seen, vec![args(&words)]);
        assert_eq!(
            decoder.multibulk,
            Progress::default(),
            "reset for the next one"
        );
        decoder.feed(b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(decoder.next_command().unwrap(), Some(args(&["PING"])));
    }

    /// The arguments whose bytes are all in `prefix`, an unfinished multibulk command.
    fn complete_args(prefix: &[u8]) -> usize {
        let Ok(Some((_, mut at))) = multibulk_count(prefix) else {
            return 0;
        };
        let mut n = 0;
        while let Ok(Some((_, next))) = bulk_arg(prefix, at) {
            n += 1;
            at = next;
        }
        n
    }

    #[test]
    fn a_bad_argument_after_good_ones_is_still_refused_when_resumed() {
        let mut decoder = CommandDecoder::default();
        decoder.feed(b"*3\r\n$4\r\nECHO\r\n");
        assert_eq!(decoder.next_command(), Ok(None));
        decoder.feed(b"$2\r\nhi\r\n:");
        assert_eq!(decoder.next_command(), Err(RespError::ExpectedBulk(':')));
    }

    #[test]
    fn a_trickled_inline_line_is_bounded_and_found() {
        let mut decoder = CommandDecoder::default();
        for byte in b"SUBSCRIBE a b\r" {
            decoder.feed(&[*byte]);
            assert_eq!(decoder.next_command(), Ok(None));
        }
        decoder.feed(b"\n");
        assert_eq!(
            decoder.next_command(),
            Ok(Some(args(&["SUBSCRIBE", "a", "b"])))
        );
        let mut decoder = CommandDecoder::default();
        let mut result = Ok(None);
        for _ in 0..=MAX_COMMAND_BYTES {
            decoder.feed(b"x");
            result = decoder.next_command();
        }
        assert_eq!(result, Err(RespError::TooLarge));
    }

    #[test]
    fn a_command_completed_past_the_bound_is_refused() {
        // Whole in one buffer, but longer than any command may be.
        let big = "y".repeat(MAX_COMMAND_BYTES / 2);
        let wire = command_bytes(&["ECHO", &big, &big]);
        assert_eq!(commands(&wire), Err(RespError::TooLarge));
        let max = vec!["c"; MAX_ARGS];
        assert_eq!(commands(&command_bytes(&max)).unwrap().len(), 1);
        let over = vec!["c"; MAX_ARGS + 1];
        assert_eq!(
            commands(&command_bytes(&over)),
            Err(RespError::MultibulkLength)
        );
    }

    fn command_bytes(words: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            out.extend(bulk(word.as_bytes()));
        }
        out
    }
}
