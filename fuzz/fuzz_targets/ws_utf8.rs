//! The incremental UTF-8 check of fragmented Text messages against `std`'s whole-message
//! check: the same verdict wherever the fragments are cut, and never more than 3 bytes
//! carried (the validator is 4 bytes in all).
#![no_main]

use comet::codec::utf8::Utf8Validator;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, bytes)) = data.split_first() else {
        return;
    };
    // Fragment lengths cycle through 1..=4 and 0 by the bits of the first byte.
    let mut validator = Utf8Validator::default();
    let mut verdict = Ok(());
    let mut at = 0;
    let mut step = 0u32;
    while at < bytes.len() && verdict.is_ok() {
        let len =
            ((u32::from(cuts) >> (2 * (step % 4))) & 3) as usize + usize::from(step % 5 == 4) * 7;
        let end = (at + len).min(bytes.len());
        verdict = validator.feed(&bytes[at..end]);
        at = end;
        step += 1;
    }
    let verdict = verdict.and_then(|()| validator.finish());
    assert_eq!(
        verdict.is_ok(),
        std::str::from_utf8(bytes).is_ok(),
        "{bytes:?}"
    );
});
