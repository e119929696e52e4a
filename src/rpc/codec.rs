//! Framing of Go's `net/rpc/jsonrpc`: a stream of JSON values, one request each, in
//! either direction. PHP clients write one per line; Go clients write them back to back.
//!
//! Pure: turns buffered bytes into [`RawFrame`]s (the bytes of one complete JSON value)
//! and replies into bytes. Framing is incremental: a pushdown scanner keeps its place
//! (position, open containers, string/escape/number state) between reads, so every byte
//! is examined once however the request is split, and each complete request is parsed
//! once. (The decoder this replaced re-parsed the buffered request from its start on
//! every read: a 10 MB call fed 64 KiB at a time cost 7.5 CPU-seconds of the control
//! thread.) A syntax error is reported as a frame of its own, at the byte where it is
//! seen, and the decoder resynchronises at the next newline, so a line-based client's
//! connection survives one bad line.

use serde_json::{Value, json};

/// Largest single request accepted, in bytes (the default of `rpc_max_request_size`).
pub const MAX_REQUEST_BYTES: usize = crate::config::DEFAULT_RPC_MAX_REQUEST_BYTES;

/// Nesting the scanner accepts; deeper is a syntax error (serde_json's own limit is 128,
/// so a value the scanner passes is never refused for depth by the parser).
const MAX_DEPTH: usize = 127;

/// One decoded unit of the stream.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A JSON value (it still has to be a valid request).
    Value(Value),
    /// Bytes that are not JSON; the text names the problem.
    Malformed(String),
}

/// One framed unit, not parsed yet: the caller chooses where to parse it (a large one
/// off the control thread).
#[derive(Debug, PartialEq)]
pub enum RawFrame {
    /// The bytes of one syntactically complete JSON value.
    Complete(Vec<u8>),
    /// Bytes that are not JSON; the text names the problem.
    Malformed(String),
}

impl RawFrame {
    /// Bytes held (0 for a malformed frame, whose bytes were dropped).
    pub fn len(&self) -> usize {
        match self {
            RawFrame::Complete(bytes) => bytes.len(),
            RawFrame::Malformed(_) => 0,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses the value. The scanner has checked the syntax; what is left to fail here is
    /// what it does not check (UTF-8 inside strings, numbers out of range).
    pub fn parse(self) -> Frame {
        match self {
            RawFrame::Complete(bytes) => match parse_value(&bytes) {
                Ok(value) => Frame::Value(value),
                Err(err) => Frame::Malformed(format!("invalid JSON: {err}")),
            },
            RawFrame::Malformed(why) => Frame::Malformed(why),
        }
    }

    /// Parses the value and checks it is a call.
    pub fn into_request(self) -> Result<Request, (Value, String)> {
        match self.parse() {
            Frame::Value(value) => parse_request(value),
            Frame::Malformed(why) => Err((Value::Null, why)),
        }
    }
}

/// Parses one JSON value as Go's `encoding/json` does, which the Go original used: an
/// escaped UTF-16 surrogate that is not half of a pair (`"\ud83d"`, a JavaScript string
/// cut inside an emoji) becomes U+FFFD. serde_json refuses the whole value, so a call
/// the original served would be refused; the value is scanned again only then.
pub(crate) fn parse_value(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice(bytes).or_else(|err| match replace_lone_surrogates(bytes) {
        Some(fixed) => serde_json::from_slice(&fixed),
        None => Err(err),
    })
}

/// `bytes` with every `\uXXXX` escape of an unpaired surrogate replaced by `\uFFFD`, as
/// Go decodes it (the escape after an unpaired leading half is read on its own); `None`
/// when there is none.
fn replace_lone_surrogates(bytes: &[u8]) -> Option<Vec<u8>> {
    let unit_at = |at: usize| -> Option<u16> {
        let escape = bytes.get(at..at + 6)?;
        if escape[0] != b'\\' || escape[1] != b'u' {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&escape[2..]).ok()?, 16).ok()
    };
    let mut out = Vec::new();
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != b'\\' {
            at += 1;
            continue;
        }
        match unit_at(at) {
            Some(0xD800..=0xDBFF) if matches!(unit_at(at + 6), Some(0xDC00..=0xDFFF)) => at += 12,
            Some(0xD800..=0xDFFF) => {
                out.extend_from_slice(&bytes[copied..at]);
                out.extend_from_slice(b"\\uFFFD");
                at += 6;
                copied = at;
            }
            // Any other escape: two bytes (its hex digits, if any, are plain bytes).
            _ => at += 2,
        }
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&bytes[copied..]);
    Some(out)
}

/// Incremental decoder over a byte buffer the caller fills.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// First byte of `buf` not yet handed out or dropped.
    start: usize,
    scanner: Scanner,
    /// After a syntax error: dropping bytes up to the next newline.
    skipping_line: bool,
    /// Largest value accepted now (raised once a connection has authenticated).
    limit: usize,
    /// Bytes examined so far, over the decoder's life (the linear-work witness).
    scanned: u64,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::with_limit(MAX_REQUEST_BYTES)
    }
}

/// The request is larger than the decoder's limit: the framing is lost, close.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("request larger than {limit} bytes")]
pub struct TooLarge {
    /// The limit that was exceeded.
    pub limit: usize,
}

impl Decoder {
    /// A decoder that accepts values of at most `limit` bytes.
    pub fn with_limit(limit: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            scanner: Scanner::default(),
            skipping_line: false,
            limit,
            scanned: 0,
        }
    }

    /// Changes the size limit; it applies to the value being received too.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// The size limit now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held that belong to no frame handed out yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes examined since the decoder was made: with incremental framing this never
    /// exceeds the bytes fed in.
    pub fn bytes_scanned(&self) -> u64 {
        self.scanned
    }

    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanner.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, parsed; `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TooLarge> {
        Ok(self.next_raw()?.map(RawFrame::parse))
    }

    /// The next complete frame, not parsed; `Ok(None)` when more bytes are needed.
    pub fn next_raw(&mut self) -> Result<Option<RawFrame>, TooLarge> {
        if self.skipping_line && !self.skip_line() {
            return Ok(None);
        }
        if self.scanner.is_idle() {
            // Between values: drop whitespace, the next byte starts one.
            let rest = &self.buf[self.start..];
            let blank = rest
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            self.scanned += blank as u64;
            self.start += blank;
            self.scanner.pos = self.start;
            if self.start == self.buf.len() {
                self.buf.clear();
                self.start = 0;
                self.scanner.pos = 0;
                return Ok(None);
            }
        }
        let before = self.scanner.pos;
        let scan = self.scanner.scan(&self.buf);
        self.scanned += (self.scanner.pos - before) as u64;
        match scan {
            Scan::More => {
                if self.scanner.pos - self.start > self.limit {
                    return Err(TooLarge { limit: self.limit });
                }
                self.compact();
                Ok(None)
            }
            Scan::Complete => {
                let end = self.scanner.pos;
                if end - self.start > self.limit {
                    // Left as it was: under a raised limit the value is framed again.
                    self.scanner.reset(self.start);
                    return Err(TooLarge { limit: self.limit });
                }
                let bytes = if self.start == 0 && end == self.buf.len() {
                    // The common case of a large call: hand the buffer over, no copy.
                    self.start = 0;
                    std::mem::take(&mut self.buf)
                } else {
                    let bytes = self.buf[self.start..end].to_vec();
                    self.start = end;
                    bytes
                };
                self.scanner.reset(self.start);
                Ok(Some(RawFrame::Complete(bytes)))
            }
            Scan::Error(what) => {
                let at = self.scanner.pos;
                // Past the limit the value is too large, broken or not: so the verdict does
                // not depend on how the bytes were split into reads.
                if at - self.start > self.limit {
                    return Err(TooLarge { limit: self.limit });
                }
                // Resynchronise at the end of the line where the error is, not the line
                // where the broken value began: the next line is the next request.
                let offset = at - self.start;
                let byte = self.buf[at];
                self.start = at;
                self.scanner.reset(at);
                self.skipping_line = true;
                self.skip_line();
                Ok(Some(RawFrame::Malformed(format!(
                    "invalid JSON: {what}, found {} at byte {offset} of the request",
                    describe(byte)
                ))))
            }
        }
    }

    /// Moves the unfinished value to the front of the buffer. Each byte moves at most
    /// once: after this `start` is 0 until the value completes.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanner.pos -= self.start;
            self.start = 0;
        }
    }

    /// Drops bytes up to and including the next newline; false if none arrived yet.
    fn skip_line(&mut self) -> bool {
        let rest = &self.buf[self.start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.scanned += end as u64 + 1;
                self.start += end + 1;
                self.scanner.reset(self.start);
                self.skipping_line = false;
                true
            }
            None => {
                self.scanned += rest.len() as u64;
                self.buf.clear();
                self.start = 0;
                self.scanner.reset(0);
                false
            }
        }
    }
}

/// A byte as an error message names it.
fn describe(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("{:?}", byte as char)
    } else {
        format!("byte 0x{byte:02x}")
    }
}

/// What a scan ended on.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// Every buffered byte is scanned and the value is not complete.
    More,
    /// The value ends just before `pos`.
    Complete,
    /// The byte at `pos` cannot continue the value; the text says what was expected.
    Error(&'static str),
}

/// Where the scanner is inside the value being received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value is expected (the top level's first byte, after `:`, after `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the container's closer.
    Next,
    /// Inside a string (a key when `key`).
    Str { key: bool, escape: Escape },
    /// Inside a number.
    Number(Number),
    /// Inside `true`, `false` or `null`: the bytes still to come.
    Literal(&'static [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After a backslash.
    Backslash,
    /// Inside `\uXXXX`: hex digits still to come.
    Hex(u8),
}

/// The number grammar of RFC 8259: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Number {
    /// Whether a number may end here.
    fn is_complete(self) -> bool {
        matches!(
            self,
            Number::Zero | Number::Int | Number::Frac | Number::Exp
        )
    }

    /// The state after `byte`, `None` if `byte` does not continue the number.
    fn next(self, byte: u8) -> Option<Number> {
        use Number::*;
        Some(match (self, byte) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') => Int,
            (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => E,
            (E, b'+' | b'-') => ESign,
            (E | ESign | Exp, b'0'..=b'9') => Exp,
            _ => return None,
        })
    }
}

/// A JSON syntax checker that can stop at any byte and go on with the next read. It only
/// finds where a value ends (or the first byte that breaks it); serde_json builds the
/// value afterwards from the complete bytes.
#[derive(Debug)]
struct Scanner {
    /// Next byte of the buffer to examine.
    pos: usize,
    state: State,
    /// Open containers, innermost last: true for an object.
    stack: Vec<bool>,
    /// Whether a value has begun (false between values).
    started: bool,
}

impl Default for Scanner {
    fn default() -> Scanner {
        Scanner {
            pos: 0,
            state: State::Value,
            stack: Vec::new(),
            started: false,
        }
    }
}

fn is_json_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scanner {
    fn is_idle(&self) -> bool {
        !self.started
    }

    /// Back to "between values", at `pos`.
    fn reset(&mut self, pos: usize) {
        self.pos = pos;
        self.state = State::Value;
        self.stack.clear();
        self.started = false;
    }

    /// A value (or the scalar just ended) is complete: true when it was the top level's.
    fn end_value(&mut self) -> bool {
        if self.stack.is_empty() {
            true
        } else {
            self.state = State::Next;
            false
        }
    }

    /// The state a value's first byte leads to; `None` if no value starts with it.
    fn begin(&mut self, byte: u8) -> Option<State> {
        Some(match byte {
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return None;
                }
                self.stack.push(byte == b'{');
                if byte == b'{' {
                    State::ObjectFirst
                } else {
                    State::ArrayFirst
                }
            }
            b'"' => State::Str {
                key: false,
                escape: Escape::None,
            },
            b'-' => State::Number(Number::Minus),
            b'0' => State::Number(Number::Zero),
            b'1'..=b'9' => State::Number(Number::Int),
            b't' => State::Literal(b"rue"),
            b'f' => State::Literal(b"alse"),
            b'n' => State::Literal(b"ull"),
            _ => return None,
        })
    }

    /// Closes the innermost container if `byte` is its closer.
    fn close(&mut self, byte: u8) -> bool {
        let object = match byte {
            b'}' => true,
            b']' => false,
            _ => return false,
        };
        if self.stack.last() == Some(&object) {
            self.stack.pop();
            true
        } else {
            false
        }
    }

    /// Examines `buf` from `pos` on.
    fn scan(&mut self, buf: &[u8]) -> Scan {
        self.started = true;
        while self.pos < buf.len() {
            let byte = buf[self.pos];
            match self.state {
                State::Str { key, escape } => match escape {
                    Escape::None => {
                        // Fast path: run to the next byte that matters.
                        let rest = &buf[self.pos..];
                        let plain = rest
                            .iter()
                            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                            .unwrap_or(rest.len());
                        self.pos += plain;
                        let Some(&byte) = buf.get(self.pos) else {
                            break;
                        };
                        match byte {
                            b'"' => {
                                self.pos += 1;
                                if key {
                                    self.state = State::Colon;
                                } else if self.end_value() {
                                    return Scan::Complete;
                                }
                            }
                            b'\\' => {
                                self.pos += 1;
                                self.state = State::Str {
                                    key,
                                    escape: Escape::Backslash,
                                };
                            }
                            _ => return Scan::Error("control character in a string"),
                        }
                    }
                    Escape::Backslash => {
                        let escape = match byte {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Escape::None,
                            b'u' => Escape::Hex(4),
                            _ => return Scan::Error("invalid escape in a string"),
                        };
                        self.pos += 1;
                        self.state = State::Str { key, escape };
                    }
                    Escape::Hex(left) => {
                        if !byte.is_ascii_hexdigit() {
                            return Scan::Error("expected a hex digit of \\u");
                        }
                        self.pos += 1;
                        let escape = if left == 1 {
                            Escape::None
                        } else {
                            Escape::Hex(left - 1)
                        };
                        self.state = State::Str { key, escape };
                    }
                },
                State::Number(number) => match number.next(byte) {
                    Some(next) => {
                        self.pos += 1;
                        self.state = State::Number(next);
                    }
                    // The byte after the number is not part of it: look at it again in
                    // the enclosing state.
                    None if number.is_complete() => {
                        if self.end_value() {
                            return Scan::Complete;
                        }
                    }
                    None => return Scan::Error("malformed number"),
                },
                State::Literal(rest) => {
                    if byte != rest[0] {
                        return Scan::Error("malformed literal");
                    }
                    self.pos += 1;
                    if rest.len() == 1 {
                        if self.end_value() {
                            return Scan::Complete;
                        }
                    } else {
                        self.state = State::Literal(&rest[1..]);
                    }
                }
                _ if is_json_space(byte) => self.pos += 1,
                State::Value => match self.begin(byte) {
                    Some(next) => {
                        self.pos += 1;
                        self.state = next;
                    }
                    None => return Scan::Error("expected a value"),
                },
                State::ArrayFirst => {
                    if self.close(byte) {
                        self.pos += 1;
                        if self.end_value() {
                            return Scan::Complete;
                        }
                    } else {
                        match self.begin(byte) {
                            Some(next) => {
                                self.pos += 1;
                                self.state = next;
                            }
                            None => return Scan::Error("expected a value or ']'"),
                        }
                    }
                }
                State::ObjectFirst | State::Key => {
                    if byte == b'"' {
                        self.pos += 1;
                        self.state = State::Str {
                            key: true,
                            escape: Escape::None,
                        };
                    } else if self.state == State::ObjectFirst && self.close(byte) {
                        self.pos += 1;
                        if self.end_value() {
                            return Scan::Complete;
                        }
                    } else {
                        return Scan::Error("expected a string key");
                    }
                }
                State::Colon => {
                    if byte != b':' {
                        return Scan::Error("expected ':'");
                    }
                    self.pos += 1;
                    self.state = State::Value;
                }
                State::Next => {
                    if byte == b',' {
                        self.pos += 1;
                        self.state = if self.stack.last() == Some(&true) {
                            State::Key
                        } else {
                            State::Value
                        };
                    } else if self.close(byte) {
                        self.pos += 1;
                        if self.end_value() {
                            return Scan::Complete;
                        }
                    } else {
                        return Scan::Error("expected ',' or the container's end");
                    }
                }
            }
        }
        Scan::More
    }
}

/// A decoded call.
#[derive(Debug, PartialEq)]
pub struct Request {
    /// e.g. `Server.SendToConnections`.
    pub method: String,
    /// The single parameter (Go sends `params: [P]`; a bare `P` is accepted too).
    pub param: Value,
    /// Echoed in the reply.
    pub id: Value,
}

/// Checks a JSON value is a call. On error, returns the id (if any) to answer with.
pub fn parse_request(value: Value) -> Result<Request, (Value, String)> {
    let Value::Object(mut object) = value else {
        return Err((Value::Null, "request must be a JSON object".into()));
    };
    let id = take_member(&mut object, "id").unwrap_or(Value::Null);
    let method = match take_member(&mut object, "method") {
        Some(Value::String(method)) if !method.is_empty() => method,
        _ => return Err((id, "request has no \"method\" string".into())),
    };
    let param = match take_member(&mut object, "params") {
        Some(Value::Array(mut params)) if params.len() == 1 => params.remove(0),
        Some(Value::Array(params)) => {
            return Err((
                id,
                format!("params must hold exactly one value, found {}", params.len()),
            ));
        }
        Some(other) => other,
        None => Value::Null,
    };
    Ok(Request { method, param, id })
}

/// Takes the member `name` out of a request object: the exact key, else one that matches
/// it ignoring ASCII case, as Go's `encoding/json` matched the original's request fields
/// (`{"Method": .., "Params": .., "ID": ..}` was served).
fn take_member(object: &mut serde_json::Map<String, Value>, name: &str) -> Option<Value> {
    if let Some(value) = object.remove(name) {
        return Some(value);
    }
    let key = object
        .keys()
        .find(|key| key.eq_ignore_ascii_case(name))?
        .clone();
    object.remove(&key)
}

/// A reply line: `{"id":..,"result":..,"error":..}\n`.
pub fn encode_reply(id: &Value, result: Result<Value, String>) -> Vec<u8> {
    let reply = match result {
        Ok(result) => json!({"id": id, "result": result, "error": null}),
        Err(error) => json!({"id": id, "result": null, "error": error}),
    };
    let mut bytes = serde_json::to_vec(&reply).expect("a JSON value always serialises");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_members_match_ignoring_case_the_exact_key_first() {
        let request =
            parse_request(json!({"Method": "Server.GetNode", "PARAMS": [{}], "Id": 4})).unwrap();
        assert_eq!(
            (request.method.as_str(), request.param, request.id),
            ("Server.GetNode", json!({}), json!(4))
        );
        let both = parse_request(json!({"ID": 1, "id": 2, "method": "m"})).unwrap();
        assert_eq!(both.id, json!(2));
    }

    #[test]
    fn unpaired_surrogates_decode_as_the_replacement_character_as_in_go() {
        for (text, decoded) in [
            (r#""\ud83d""#, "\u{FFFD}"),
            (r#""a\udc00b""#, "a\u{FFFD}b"),
            (r#""\ud83d\u0041""#, "\u{FFFD}A"),
            (r#""\ud83d\ud83d\ude00""#, "\u{FFFD}\u{1F600}"),
            (r#""\ud83d\ude00""#, "\u{1F600}"),
            (r#""\\ud83d""#, "\\ud83d"),
        ] {
            assert_eq!(
                parse_value(text.as_bytes()).unwrap(),
                json!(decoded),
                "{text}"
            );
        }
        assert_eq!(
            parse_value(br#"{"m":"\uDBFF","n":1}"#).unwrap(),
            json!({"m": "\u{FFFD}", "n": 1})
        );
        assert!(parse_value(br#""\ud83"#).is_err());
        assert!(parse_value(b"[1,").is_err());
    }

    fn frames(input: &[&[u8]]) -> Vec<Frame> {
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        for chunk in input {
            decoder.extend(chunk);
            while let Some(frame) = decoder.next_frame().unwrap() {
                out.push(frame);
            }
        }
        out
    }

    #[test]
    fn back_to_back_and_split_objects() {
        let out = frames(&[b"{\"a\":1}{\"b\"", b":2}\n"]);
        assert_eq!(
            out,
            vec![Frame::Value(json!({"a":1})), Frame::Value(json!({"b":2}))]
        );
    }

    #[test]
    fn a_bad_line_is_reported_and_the_next_line_still_parses() {
        let out = frames(&[b"{nope\n{\"ok\":true}\n"]);
        assert!(matches!(out[0], Frame::Malformed(_)));
        assert_eq!(out[1], Frame::Value(json!({"ok": true})));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_bad_line_split_across_reads_is_skipped_whole() {
        let out = frames(&[b"garbage gar", b"bage\n{\"x\":1}\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], Frame::Value(json!({"x": 1})));
    }

    #[test]
    fn an_object_broken_on_its_second_line_costs_one_error() {
        let out = frames(&[b"{\"a\": [\nnot json\n{\"b\":1}\n"]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0], Frame::Malformed(_)));
        assert_eq!(out[1], Frame::Value(json!({"b": 1})));
    }

    #[test]
    fn the_scan_position_is_kept_between_reads() {
        let mut decoder = Decoder::default();
        decoder.extend(br#"{"method":"Server.X","par"#);
        assert_eq!(decoder.next_frame(), Ok(None));
        let scanned = decoder.bytes_scanned();
        assert_eq!(scanned, 25, "every byte fed is examined once");
        let second = br#"ams":["a\"}"]"#;
        decoder.extend(second);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(
            decoder.bytes_scanned(),
            scanned + second.len() as u64,
            "only the new bytes"
        );
        decoder.extend(b",\"id\":1}\n");
        let frame = decoder.next_frame().unwrap().unwrap();
        assert_eq!(
            frame,
            Frame::Value(json!({"method":"Server.X","params":["a\"}"],"id":1}))
        );
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.buffered(), 0);
    }

    /// Inside-string state survives a split anywhere: a quote, a backslash, a `\u`
    /// escape or a number cut in two must not end (or break) the value early.
    #[test]
    fn every_split_point_agrees_with_a_one_shot_parse() {
        let text = br#"{"a":"x\"y\\","u":"\u00e9\ud83d\ude00","n":[-0.5e+10,0,12],"t":true,"f":false,"z":null,"o":{"k":[]}} 42 "s" [1]"#;
        let whole = frames(&[text]);
        assert_eq!(whole.len(), 4, "{whole:?}");
        for cut in 1..text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(frames(&[a, b]), whole, "split at {cut}");
        }
        let bytewise: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(frames(&bytewise), whole);
    }

    #[test]
    fn a_huge_request_fed_in_small_chunks_costs_linear_work() {
        // 4 MiB of recipients fed 1 KiB at a time: the old decoder re-parsed the
        // buffered request on each of the 4,096 reads (~8 GiB examined).
        let ids: Vec<String> = (0..400_000).map(|i| format!("conn-{i}")).collect();
        let request = json!({"method":"Server.SendToConnections",
            "params":[{"connections": ids, "msg": "m\"sg", "token": ""}], "id": 1});
        let mut bytes = serde_json::to_vec(&request).unwrap();
        bytes.push(b'\n');
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(1024) {
            decoder.extend(chunk);
            while let Some(frame) = decoder.next_frame().unwrap() {
                out.push(frame);
            }
        }
        assert_eq!(out, vec![Frame::Value(request)]);
        assert!(
            decoder.bytes_scanned() <= bytes.len() as u64,
            "{} bytes examined for {} fed",
            decoder.bytes_scanned(),
            bytes.len()
        );
    }

    #[test]
    fn the_limit_applies_before_the_value_ends_and_can_be_raised() {
        let mut decoder = Decoder::with_limit(64);
        decoder.extend(b"{\"pad\":\"");
        decoder.extend(&[b'x'; 60]);
        assert_eq!(decoder.next_raw(), Err(TooLarge { limit: 64 }));

        // Raised between two calls (the first one authenticated the connection), the
        // second may be large.
        let small = br#"{"method":"Server.Status","params":[{"token":"t"}],"id":1}"#;
        let big = format!(
            r#"{{"method":"m","params":["{}"],"id":2}}"#,
            "y".repeat(500)
        );
        let mut decoder = Decoder::with_limit(small.len());
        decoder.extend(small);
        decoder.extend(big.as_bytes());
        assert!(matches!(
            decoder.next_raw(),
            Ok(Some(RawFrame::Complete(_)))
        ));
        assert_eq!(decoder.buffered(), big.len());
        assert_eq!(decoder.next_raw(), Err(TooLarge { limit: small.len() }));
        decoder.set_limit(1024);
        let frame = decoder.next_raw().unwrap().unwrap();
        assert_eq!(frame.len(), big.len());
        // Broken past the limit is too large, however it was split.
        let mut long = b"[".to_vec();
        long.extend(b"1,".repeat(40));
        long.push(b'x');
        let mut whole = Decoder::with_limit(64);
        whole.extend(&long);
        assert_eq!(whole.next_raw(), Err(TooLarge { limit: 64 }));
        // Whitespace and skipped lines are not held: they cannot grow the buffer.
        let mut decoder = Decoder::with_limit(16);
        decoder.extend(&[b' '; 1000]);
        assert_eq!(decoder.next_raw(), Ok(None));
        decoder.extend(b"!");
        decoder.extend(&[b'z'; 1000]);
        assert!(matches!(
            decoder.next_raw(),
            Ok(Some(RawFrame::Malformed(_)))
        ));
        assert_eq!(decoder.next_raw(), Ok(None));
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn syntax_errors_name_the_byte_and_do_not_wait_for_the_end() {
        for bad in [
            &b"{\"a\" 1}"[..],
            b"[1 2]",
            b"{\"a\":tru }",
            b"{\"a\":\"\\q\"}",
            b"{\"a\":\"\\u12g4\"}",
            b"[01]",
            b"[-]",
            b"{\"a\":1,}",
            b"[1,]",
            b"}",
            b"{\"a\":\"line\nbreak\"}",
        ] {
            let mut line = bad.to_vec();
            line.extend_from_slice(b"\n{\"ok\":1}\n");
            let out = frames(&[&line]);
            assert!(
                matches!(&out[0], Frame::Malformed(why) if why.starts_with("invalid JSON")),
                "{:?}: {out:?}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(out.last(), Some(&Frame::Value(json!({"ok": 1}))));
        }
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(matches!(frames(&[deep.as_bytes()])[0], Frame::Malformed(_)));
        let out = frames(&[&[b'"', 0xff, b'"', b'\n']]);
        assert!(
            matches!(out[0], Frame::Malformed(_)),
            "invalid UTF-8: {out:?}"
        );
    }

    #[test]
    fn request_shapes() {
        let req = parse_request(json!({"method":"Server.X","params":[{"k":1}],"id":7})).unwrap();
        assert_eq!(req.param, json!({"k":1}));
        assert_eq!(req.id, json!(7));
        let (id, why) = parse_request(json!({"params":[],"id":3})).unwrap_err();
        assert_eq!(id, json!(3));
        assert!(why.contains("method"));
        assert!(parse_request(json!({"method":"m","params":[1,2],"id":1})).is_err());
        assert!(parse_request(json!([1])).is_err());
    }

    #[test]
    fn reply_has_go_shape() {
        let line = encode_reply(&json!(7), Err("boom".into()));
        assert_eq!(
            line,
            b"{\"error\":\"boom\",\"id\":7,\"result\":null}\n".to_vec()
        );
    }
}
