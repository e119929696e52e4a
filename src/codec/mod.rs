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

    /// A message made for one session that goes uncompressed even where permessage-deflate
    /// was negotiated (RSV1 clear, as RFC 7692 allows per message): a recovering client's
    /// numbered frame is its own, so compressing it would cost a compression per
    /// recipient (measured: 3 broadcasts of 64 KiB to 1,000 such clients took 3.63 s of
    /// CPU compressed, 0.27 s not, 0.10 s for clients that share one compressed frame).
    pub(crate) fn uncompressed(payload: &[u8]) -> Arc<Message> {
        let message = Message::new(payload);
        let _ = message.websocket_deflate.set(None);
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
                match made_once(&self.websocket_deflate, || {
                    deflate::frame(&self.payload, settings)
                }) {
                    Some(frame) => frame.bytes(),
                    None => self.encoded(Wire::WebSocket),
                }
            }
            Wire::WebSocket => {
                made_once(&self.websocket, || EncodedFrame::text(&self.payload)).bytes()
            }
            Wire::JsonLines => {
                made_once(&self.json_line, || json::message_line(&self.payload)).as_ref()
            }
            Wire::Resp => made_once(&self.resp_bulk, || resp::bulk(&self.payload).into()).as_ref(),
            Wire::Sse => made_once(&self.sse_event, || sse::event(&self.payload)).as_ref(),
        }
    }
}

/// The value of `cell`, made by `make` if no shard has made it yet. Never waits for
/// another shard that is making it (`OnceLock::get_or_init` would: a shard compressing a
/// 12 MiB push held every other shard that sent it for 254-282 ms): two shards that race
/// each make their own, and the first one stored is kept for everyone after.
fn made_once<T>(cell: &OnceLock<T>, make: impl FnOnce() -> T) -> &T {
    if let Some(made) = cell.get() {
        return made;
    }
    // `set` waits only while another thread moves its finished value in.
    let _ = cell.set(make());
    cell.get()
        .expect("set just now, by us or by the shard that won")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFLATE: Wire = Wire::WebSocketDeflate(deflate::Deflate {
        level: 6,
        min_size: 16,
    });

    #[test]
    fn a_message_made_for_one_session_goes_uncompressed_and_large_ones_too() {
        let text = "compressible ".repeat(100);
        let shared = Message::new(text.as_bytes());
        assert_eq!(shared.encoded(DEFLATE)[0], 0xc1, "RSV1: compressed");
        let own = Message::uncompressed(text.as_bytes());
        assert_eq!(own.encoded(DEFLATE), own.encoded(Wire::WebSocket));
        let large = Message::new(&vec![b'a'; deflate::MAX_COMPRESSED_PAYLOAD + 1]);
        assert_eq!(large.encoded(DEFLATE)[0], 0x81, "past the bound: plain");
    }

    #[test]
    fn shards_racing_to_encode_each_get_the_same_bytes() {
        let message = Message::new("racing ".repeat(1000).as_bytes());
        let frames: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| message.encoded(DEFLATE).to_vec()))
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert!(frames.iter().all(|f| *f == frames[0]));
        assert_eq!(message.encoded(DEFLATE), frames[0]);
    }

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
