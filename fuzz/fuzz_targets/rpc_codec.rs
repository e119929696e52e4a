//! The push RPC's byte stream: framing, resynchronisation and request shapes.
#![no_main]

use comet::rpc::codec::{Decoder, Frame, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let mut decoder = Decoder::default();
    for chunk in bytes.chunks(usize::from(split).max(1)) {
        decoder.extend(chunk);
        while let Ok(Some(frame)) = decoder.next_frame() {
            if let Frame::Value(value) = frame {
                let _ = parse_request(value);
            }
        }
    }
});
