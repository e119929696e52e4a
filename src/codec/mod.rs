//! Message protocols: how one pushed message looks on each kind of client connection.
//!
//! A push is encoded at most once per wire format, lazily, by whichever shard first needs
//! that format; every recipient on every shard then shares those bytes. This module
//! owns the per-protocol encoders and the decoders of what clients send; it does no I/O.

pub mod deflate;
pub mod frame;
pub mod json;
pub mod resp;
pub(crate) mod sse;
pub mod utf8;

use std::sync::{Arc, OnceLock};

use crate::codec::frame::EncodedFrame;

/// The framing a client's connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// WebSocket Text frames (plain or over TLS).
    WebSocket,
    /// WebSocket with permessage-deflate negotiated: compressed Text frames (RSV1) for
    /// payloads the settings compress, plain ones for the rest.
    WebSocketDeflate(deflate::Deflate),
    /// One JSON object per line over TCP.
    JsonLines,
    /// Redis pub/sub replies (RESP2 `message` arrays or RESP3 push frames).
    Resp,
    /// Server-Sent Events: one `data:` event per message.
    Sse,
}

impl Wire {
    /// A short label for logs and metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Wire::WebSocket | Wire::WebSocketDeflate(_) => "websocket",
            Wire::JsonLines => "json",
            Wire::Resp => "resp",
            Wire::Sse => "sse",
        }
    }
}

/// One pushed message, shared by all its recipients.
#[derive(Debug)]
pub(crate) struct Message {
    payload: Box<[u8]>,
    websocket: OnceLock<EncodedFrame>,
    /// `None`: compression does not pay for this payload, the plain frame goes instead.
    websocket_deflate: OnceLock<Option<EncodedFrame>>,
    json_line: OnceLock<Box<[u8]>>,
    resp_bulk: OnceLock<Box<[u8]>>,
    sse_event: OnceLock<Box<[u8]>>,
}

impl Message {
    /// A message carrying `payload` (the `msg` of a push, as given).
    pub(crate) fn new(payload: &[u8]) -> Arc<Message> {
        Arc::new(Message {
            payload: payload.into(),
            websocket: OnceLock::new(),
            websocket_deflate: OnceLock::new(),
            json_line: OnceLock::new(),
            resp_bulk: OnceLock::new(),
            sse_event: OnceLock::new(),
        })
    }

    /// A message whose JSON line is `line` as given rather than encoded from `payload`: a
    /// recovering client's numbered line (`recovery::message_line`), one per session.
    pub(crate) fn with_json_line(payload: &[u8], line: Box<[u8]>) -> Arc<Message> {
        let message = Message::new(payload);
        let _ = message.json_line.set(line);
        message
    }

    /// A message whose event-stream bytes are `event` (a recovering client's numbered
    /// event, made for it alone), the other formats encoded from `payload` as usual.
    pub(crate) fn with_sse_event(payload: &[u8], event: Box<[u8]>) -> Arc<Message> {
        let message = Message::new(payload);
        let _ = message.sse_event.set(event);
        message
    }

    /// The message as the application sees it.
    pub(crate) fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The bytes that carry this message on `wire`. For RESP these are only the payload's
    /// bulk string: the array header naming the client's channel is per connection. The
    /// compressed frame is made with the settings of the first session that asks (every
    /// session of a node has the same).
    pub(crate) fn encoded(&self, wire: Wire) -> &[u8] {
        match wire {
            Wire::WebSocketDeflate(settings) => {
                match self
                    .websocket_deflate
                    .get_or_init(|| deflate::frame(&self.payload, settings))
                {
                    Some(frame) => frame.bytes(),
                    None => self.encoded(Wire::WebSocket),
                }
            }
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
            Wire::Sse => self.sse_event.get_or_init(|| sse::event(&self.payload)),
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
        assert_eq!(message.encoded(Wire::Sse), b"data: hi\n\n");
    }

    #[test]
    fn the_compressed_frame_is_made_once_and_small_messages_stay_plain() {
        let settings = deflate::Deflate {
            level: 6,
            min_size: 256,
        };
        let wire = Wire::WebSocketDeflate(settings);
        let big = Message::new(&b"{\"n\":1}".repeat(100));
        let first = big.encoded(wire);
        assert_eq!(first[0], 0xC1, "FIN + RSV1 + Text");
        assert!(first.len() < 100);
        assert_eq!(big.encoded(wire).as_ptr(), first.as_ptr());
        let small = Message::new(b"hi");
        assert_eq!(small.encoded(wire), b"\x81\x02hi");
        assert_eq!(
            small.encoded(wire).as_ptr(),
            small.encoded(Wire::WebSocket).as_ptr()
        );
    }
}
