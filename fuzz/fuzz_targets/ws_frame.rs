//! Client WebSocket frames, fed in arbitrary chunks: never panics, never buffers more
//! than one frame's worth, and whatever it lets through keeps RFC 6455's rules: control
//! payloads of at most 125 bytes, only close codes a peer may send, Text messages that
//! are UTF-8 as a whole, and nothing at all after the client's Close.
#![no_main]

use comet::codec::frame::{Decoder, Inbound, Rules, close_code};
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE: usize = 512;
/// The longest client frame header (2 + 8 length + 4 mask).
const MAX_HEADER: usize = 14;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    // The low bit of the split byte negotiates permessage-deflate (RSV1 allowed).
    let rules = Rules {
        max_message: MAX_MESSAGE,
        deflate: split & 1 == 1,
    };
    let mut decoder = Decoder::default();
    let mut text = Vec::new();
    let mut closed = false;
    for chunk in bytes.chunks(usize::from(split).max(1)) {
        let fed = decoder.feed(chunk, rules, |frame| {
            assert!(!closed, "a frame was delivered after the client's Close");
            match frame {
                Inbound::Ping(payload) => assert!(payload.len() <= 125),
                Inbound::Pong => {}
                Inbound::Close(code) => {
                    closed = true;
                    assert!(code.is_none_or(close_code::is_valid), "{code:?}");
                }
                Inbound::Data {
                    payload,
                    fin,
                    text: is_text,
                    compressed,
                } => {
                    assert!(rules.deflate || !compressed, "RSV1 let through unnegotiated");
                    if is_text && !compressed {
                        text.extend_from_slice(&payload);
                        if fin {
                            assert!(
                                std::str::from_utf8(&text).is_ok(),
                                "invalid text let through"
                            );
                        }
                    }
                    if fin {
                        text.clear();
                    }
                    assert!(text.len() <= MAX_MESSAGE);
                }
            }
        });
        if fed.is_err() {
            return;
        }
        assert!(decoder.buffered() <= MAX_HEADER + MAX_MESSAGE);
    }
});
