//! The push RPC's byte stream: incremental framing, resynchronisation and request
//! shapes. The same bytes fed in random splits must give the same frames as fed whole,
//! no byte may be examined twice, and whatever the decoder holds stays within its limit.
#![no_main]

use comet::rpc::codec::{Decoder, Frame, RawFrame, parse_request};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches it.
const LIMIT: usize = 4096;

/// The frames of `bytes` fed in the given chunk sizes (cycled; 0 reads as 1), and
/// whether the decoder gave up (too large).
fn decode(bytes: &[u8], splits: &[usize]) -> (Vec<Frame>, bool) {
    let mut decoder = Decoder::with_limit(LIMIT);
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut sizes = splits.iter().cycle();
    let mut fed = 0u64;
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap_or(&1)).max(1).min(rest.len());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        decoder.extend(chunk);
        fed += chunk.len() as u64;
        loop {
            match decoder.next_raw() {
                Ok(Some(raw)) => {
                    if let RawFrame::Complete(value) = &raw {
                        assert!(value.len() <= LIMIT);
                    }
                    frames.push(raw.parse());
                }
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
        assert!(
            decoder.bytes_scanned() <= fed,
            "{} bytes examined of {fed} fed",
            decoder.bytes_scanned()
        );
        assert!(decoder.buffered() <= LIMIT + chunk.len());
    }
    (frames, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, data)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8).min(data.len());
    let (splits, bytes) = data.split_at(count);
    let splits: Vec<usize> = splits.iter().map(|&s| usize::from(s)).collect();
    let (whole, whole_too_large) = decode(bytes, &[bytes.len()]);
    let (split, split_too_large) = decode(bytes, if splits.is_empty() { &[1] } else { &splits });
    // The same value is too large however it arrives, so even then the frames before it
    // agree.
    assert_eq!(whole_too_large, split_too_large, "too large one way only");
    assert_eq!(whole, split, "split feeding disagrees with one-shot feeding");
    for frame in whole {
        if let Frame::Value(value) = frame {
            let _ = parse_request(value);
        }
    }
});
