//! JSON-lines from a raw TCP client: the token line and the lines after it.
#![no_main]

use comet::codec::json::{LineDecoder, parse_client_line};
use comet::token::token_from_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = LineDecoder::default();
    let mut first = true;
    let _ = decoder.feed(data, 512, |line| {
        // The limit, plus the `\r` of a `\r\n` ending.
        assert!(line.len() <= 512 || (line.len() == 513 && line.ends_with(b"\r")));
        if std::mem::take(&mut first) {
            let _ = token_from_json(line);
        } else {
            let _ = parse_client_line(line);
        }
    });
});
