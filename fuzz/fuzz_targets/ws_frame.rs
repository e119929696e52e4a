//! Client WebSocket frames, fed in arbitrary chunks: never panics, never buffers more
//! than one frame's worth.
#![no_main]

use comet::transport::ws::frame::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let mut decoder = Decoder::default();
    for chunk in bytes.chunks(usize::from(split).max(1)) {
        if decoder.feed(chunk, 512, |_| {}).is_err() {
            return;
        }
    }
});
