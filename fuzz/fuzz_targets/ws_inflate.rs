//! Compressed client messages: arbitrary bytes inflated with a bound. Never panics, and
//! whatever passes inflated within the bound (checked against flate2 inflating the same
//! input without one), as UTF-8 when the first byte asks for a Text message.
#![no_main]

use comet::transport::ws::deflate::inflate_checked;
use flate2::{Decompress, FlushDecompress};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, compressed)) = data.split_first() else {
        return;
    };
    let text = flags & 1 == 1;
    if inflate_checked(compressed, LIMIT, text).is_err() {
        return;
    }
    let mut input = compressed.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(LIMIT * 4);
    if Decompress::new(false)
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .is_ok()
        && out.len() < out.capacity()
    {
        assert!(out.len() <= LIMIT, "{} bytes let through", out.len());
        if text {
            assert!(std::str::from_utf8(&out).is_ok(), "invalid text let through");
        }
    }
});
