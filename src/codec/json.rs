//! JSON-lines: the message protocol of raw TCP clients that start with `{`.
//!
//! Every line either way is one JSON object ending in `\n`. The client's first line is
//! its token object (the WebSocket `t` parameter's JSON); after that the server sends
//! `message`, `ping`, `pong`, `error` and `close` lines, and the client may send `ping`,
//! `pong` or anything else (logged, not routed). This module builds and splits lines; it
//! does no I/O and never buffers more than one line of `max_line` bytes.

use serde::Deserialize;

/// The server's heartbeat probe; the client answers with [`PONG_LINE`]'s twin.
pub const PING_LINE: &[u8] = b"{\"type\":\"ping\"}\n";
/// The answer to a client's ping.
pub const PONG_LINE: &[u8] = b"{\"type\":\"pong\"}\n";

/// What a JSON value is, in words: for errors that name what a client sent without
/// repeating it (it may be as large as a request).
pub(crate) fn kind_of(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A pushed message: `{"type":"message","data":"<msg>"}`.
pub fn message_line(payload: &[u8]) -> Box<[u8]> {
    line(
        "message",
        &[("data", &json_string(&String::from_utf8_lossy(payload)))],
    )
}

/// The answer to an accepted token line.
pub fn welcome_line(conn_id: &str) -> Box<[u8]> {
    line("ok", &[("conn_id", &json_string(conn_id))])
}

/// An error the client caused; whether the connection stays open is the caller's call.
pub fn error_line(reason: &str) -> Box<[u8]> {
    line("error", &[("error", &json_string(reason))])
}

/// The last line before the server closes the connection (same codes as WebSocket).
pub fn close_line(code: u16, reason: &str) -> Box<[u8]> {
    line(
        "close",
        &[
            ("code", &code.to_string()),
            ("reason", &json_string(reason)),
        ],
    )
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// `{"type":"<kind>",<fields>}\n`, `type` first so that a human reading an `nc`
/// session sees what each line is; `fields` are already JSON values.
fn line(kind: &str, fields: &[(&str, &str)]) -> Box<[u8]> {
    let mut out = format!("{{\"type\":\"{kind}\"");
    for (name, value) in fields {
        out.push_str(&format!(",\"{name}\":{value}"));
    }
    out.push_str("}\n");
    out.into_bytes().into_boxed_slice()
}

/// What a client line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientLine {
    /// An empty line: counts as a sign of life, nothing else.
    Blank,
    /// `{"type":"ping"}`: answer with a pong.
    Ping,
    /// `{"type":"pong"}`: the answer to our heartbeat.
    Pong,
    /// Any other JSON object (not routed anywhere, as WebSocket client messages).
    Data,
}

#[derive(Deserialize)]
struct Typed {
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// Reads one client line (without its `\n`; a trailing `\r` is ignored).
pub fn parse_client_line(line: &[u8]) -> Result<ClientLine, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(ClientLine::Blank);
    }
    // serde_json skips the strings of fields it ignores without checking their UTF-8: a
    // line must be text before it can be JSON.
    let line = std::str::from_utf8(line).map_err(|e| {
        format!(
            "line is not a JSON object: invalid UTF-8 at byte {}",
            e.valid_up_to()
        )
    })?;
    let typed: Typed =
        serde_json::from_str(line).map_err(|e| format!("line is not a JSON object: {e}"))?;
    Ok(match typed.kind.as_deref() {
        Some("ping") => ClientLine::Ping,
        Some("pong") => ClientLine::Pong,
        _ => ClientLine::Data,
    })
}

/// A line longer than the limit: the client is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line longer than {limit} bytes")]
pub struct LineTooLong {
    /// The limit that was crossed.
    pub limit: usize,
}

/// Splits a byte stream into lines, keeping at most one unfinished line.
#[derive(Debug, Default)]
pub struct LineDecoder {
    partial: Vec<u8>,
}

impl LineDecoder {
    /// Feeds bytes read from the client; calls `on_line` for each complete line (without
    /// its `\n`). Stops at the first line over `max_line` bytes, not counting the `\r`
    /// of a `\r\n` ending (which the line's reader ignores).
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        max_line: usize,
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<(), LineTooLong> {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&bytes[..end], &bytes[end + 1..]);
            let last = head.last().or(self.partial.last());
            let cr = usize::from(last == Some(&b'\r'));
            if self.partial.len() + head.len() - cr > max_line {
                return Err(LineTooLong { limit: max_line });
            }
            if self.partial.is_empty() {
                on_line(head);
            } else {
                self.partial.extend_from_slice(head);
                on_line(&self.partial);
                self.partial = Vec::new();
            }
            bytes = rest;
        }
        // Unfinished: one byte more than the limit may be the `\r` before its `\n`.
        let held = self.partial.len() + bytes.len();
        let last = bytes.last().or(self.partial.last());
        if held > max_line + 1 || (held == max_line + 1 && last != Some(&b'\r')) {
            return Err(LineTooLong { limit: max_line });
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(
        decoder: &mut LineDecoder,
        bytes: &[u8],
        max: usize,
    ) -> Result<Vec<Vec<u8>>, LineTooLong> {
        let mut out = Vec::new();
        decoder.feed(bytes, max, |line| out.push(line.to_vec()))?;
        Ok(out)
    }

    #[test]
    fn lines_split_across_reads_are_joined() {
        let mut decoder = LineDecoder::default();
        assert_eq!(
            lines(&mut decoder, b"{\"a\"", 64).unwrap(),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            lines(&mut decoder, b":1}\n{}\n{", 64).unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"{}".to_vec()]
        );
        assert_eq!(
            lines(&mut decoder, b"}\n", 64).unwrap(),
            vec![b"{}".to_vec()]
        );
    }

    #[test]
    fn a_line_over_the_limit_is_refused_even_without_its_newline() {
        let mut decoder = LineDecoder::default();
        assert_eq!(
            lines(&mut decoder, &[b'x'; 10], 8),
            Err(LineTooLong { limit: 8 })
        );
        let mut decoder = LineDecoder::default();
        assert!(lines(&mut decoder, b"12345678\n", 8).is_ok());
        assert!(lines(&mut decoder, b"123456789\n", 8).is_err());
    }

    #[test]
    fn the_cr_of_a_crlf_ending_does_not_count_against_the_limit() {
        let line = [b'x'; 8];
        let mut decoder = LineDecoder::default();
        let crlf = [&line[..], b"\r\n"].concat();
        assert_eq!(
            lines(&mut decoder, &crlf, 8).unwrap(),
            vec![[&line[..], b"\r"].concat()]
        );
        // Split anywhere, the \r included.
        for split in 0..crlf.len() {
            let mut decoder = LineDecoder::default();
            let mut seen = lines(&mut decoder, &crlf[..split], 8).unwrap();
            seen.extend(lines(&mut decoder, &crlf[split..], 8).unwrap());
            assert_eq!(seen.len(), 1, "split at {split}");
        }
        // A ninth byte that is not a \r is over, with or without its \n yet.
        let mut decoder = LineDecoder::default();
        assert!(lines(&mut decoder, b"123456789", 8).is_err());
        let mut decoder = LineDecoder::default();
        assert!(lines(&mut decoder, b"12345678\r\r\n", 8).is_err());
        let mut decoder = LineDecoder::default();
        assert!(lines(&mut decoder, b"12345678\r", 8).is_ok());
        assert!(lines(&mut decoder, b"x", 8).is_err());
    }

    #[test]
    fn invalid_utf8_is_refused_like_any_non_json_line() {
        let why = parse_client_line(b"{\"note\":\"caf\xe9\"}").unwrap_err();
        assert_eq!(why, "line is not a JSON object: invalid UTF-8 at byte 12");
        assert_eq!(
            parse_client_line("{\"note\":\"café\"}".as_bytes()),
            Ok(ClientLine::Data)
        );
    }

    #[test]
    fn client_lines_are_classified() {
        assert_eq!(
            parse_client_line(b"{\"type\":\"ping\"}\r"),
            Ok(ClientLine::Ping)
        );
        assert_eq!(
            parse_client_line(b"{\"type\":\"pong\"}"),
            Ok(ClientLine::Pong)
        );
        assert_eq!(parse_client_line(b"{\"hello\":1}"), Ok(ClientLine::Data));
        assert_eq!(parse_client_line(b"  "), Ok(ClientLine::Blank));
        assert!(
            parse_client_line(b"ping")
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(parse_client_line(b"[1]").is_err());
    }

    #[test]
    fn server_lines_are_one_json_object_each() {
        let line = message_line("a\nb \"q\"".as_bytes());
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["data"], "a\nb \"q\"");
        let close: serde_json::Value =
            serde_json::from_slice(&close_line(1001, "going away")).unwrap();
        assert_eq!(close["code"], 1001);
    }
}
