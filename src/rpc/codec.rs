//! Framing of Go's `net/rpc/jsonrpc`: a stream of JSON objects, one request each, in
//! either direction. PHP clients write one per line; Go clients write them back to back.
//!
//! Pure: turns buffered bytes into [`Frame`]s and replies into bytes. A syntax error is
//! reported as a frame of its own and the decoder resynchronises at the next newline, so
//! a line-based client's connection survives one bad line.

use serde_json::{Value, json};

/// Largest single request accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// One decoded unit of the stream.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A JSON value (it still has to be a valid request).
    Value(Value),
    /// Bytes that are not JSON; the text names the problem.
    Malformed(String),
}

/// Incremental decoder over a byte buffer the caller fills.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    skipping_line: bool,
}

/// The request is larger than [`MAX_REQUEST_BYTES`]: the framing is lost, close.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("request larger than {MAX_REQUEST_BYTES} bytes")]
pub struct TooLarge;

impl Decoder {
    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TooLarge> {
        if self.skipping_line && !self.skip_line() {
            return Ok(None);
        }
        let start = self.buf.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            self.buf.clear();
            return Ok(None);
        };
        self.buf.drain(..start);
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) => {
                let used = values.byte_offset();
                self.buf.drain(..used);
                Ok(Some(Frame::Value(value)))
            }
            Some(Err(err)) if err.is_eof() => {
                if self.buf.len() > MAX_REQUEST_BYTES {
                    return Err(TooLarge);
                }
                Ok(None)
            }
            Some(Err(err)) => {
                // Resynchronise at the end of the line where the error is, not the line
                // where the broken value began: the next line is the next request.
                let at = error_offset(&self.buf, err.line(), err.column());
                self.buf.drain(..at);
                self.skipping_line = true;
                self.skip_line();
                Ok(Some(Frame::Malformed(format!("invalid JSON: {err}"))))
            }
            None => Ok(None),
        }
    }

    /// Drops bytes up to and including the next newline; false if none arrived yet.
    fn skip_line(&mut self) -> bool {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.buf.drain(..=end);
                self.skipping_line = false;
                true
            }
            None => {
                self.buf.clear();
                false
            }
        }
    }
}

/// The byte offset of serde_json's 1-based line and column in `buf`.
fn error_offset(buf: &[u8], line: usize, column: usize) -> usize {
    let line_start = if line <= 1 {
        0
    } else {
        buf.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(line - 2)
            .map_or(buf.len(), |(i, _)| i + 1)
    };
    (line_start + column.saturating_sub(1)).min(buf.len())
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
    let id = object.remove("id").unwrap_or(Value::Null);
    let method = match object.remove("method") {
        Some(Value::String(method)) if !method.is_empty() => method,
        _ => return Err((id, "request has no \"method\" string".into())),
    };
    let param = match object.remove("params") {
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
