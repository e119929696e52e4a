//! Message protocols: how one pushed message looks on each kind of client connection.
//!
//! A push is encoded at most once per wire format, lazily, by whichever shard first needs
//! that format; every recipient on every shard then shares those bytes. This module
//! owns the per-protocol encoders and the decoders of what clients send; it does no I/O.

pub mod json;
pub mod resp;

use std::sync::{Arc, OnceLock};

use crate::transport::ws::frame::EncodedFrame;

/// The framing a client's connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// WebSocket Text frames (plain or over TLS).
    WebSocket,
    /// One JSON object per line over TCP.
    JsonLines,
    /// Redis pub/sub replies (RESP2 `message` arrays or RESP3 push frames).
    Resp,
}

impl Wire {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Wire::WebSocket => "websocket",
            Wire::JsonLines => "json",
            Wire::Resp => "resp",
        }
    }
}

/// One pushed message, shared by all its recipients.
#[derive(Debug)]
pub struct Message {
    payload: Box<[u8]>,
    websocket: OnceLock<EncodedFrame>,
    json_line: OnceLock<Box<[u8]>>,
    resp_bulk: OnceLock<Box<[u8]>>,
}

impl Message {
    /// A message carrying `payload` (the `msg` of a push, as given).
    pub fn new(payload: &[u8]) -> Arc<Message> {
        Arc::new(Message {
            payload: payload.into(),
            websocket: OnceLock::new(),
            json_line: OnceLock::new(),
            resp_bulk: OnceLock::new(),
        })
    }

    /// A message whose JSON line is `line` as given rather than encoded from `payload`: a
    /// recovering client's numbered line (`recovery::message_line`), one per session.
    pub(crate) fn with_json_line(payload: &[u8], line: Box<[u8]>) -> Arc<Message> {
        let message = Message::new(payload);
        let _ = message.json_line.set(line);
        message
    }

    /// The message as the application sees it.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The bytes that carry this message on `wire`. For RESP these are only the payload's
    /// bulk string: the array header naming the client's channel is per connection.
    pub fn encoded(&self, wire: Wire) -> &[u8] {
        match wire {
            Wire::WebSocket => self
                .websocket
                .get_or_init(|| EncodedFrame::text(&self.payload))
                .bytes(),
            Wire::JsonLines => self
                .json_line
                .get_or_init(|| json::message_line(&self.payload)),
            Wire::Resp => self
                .resp_bulk
                .get_or_init(|| resp::bulk(&self.payload).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wire_is_encoded_once_and_shared() {
        let message = Message::new(b"hi");
        let first = message.encoded(Wire::Resp).as_ptr();
        assert_eq!(message.encoded(Wire::Resp), b"$2\r\nhi\r\n");
        assert_eq!(message.encoded(Wire::Resp).as_ptr(), first);
        assert_eq!(message.encoded(Wire::WebSocket), b"\x81\x02hi");
        assert_eq!(
            message.encoded(Wire::JsonLines),
            b"{\"type\":\"message\",\"data\":\"hi\"}\n"
        );
    }
}
