//! RESP commands from a raw TCP client (multibulk and inline), fed in arbitrary splits.
#![no_main]

use comet::codec::resp::CommandDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut decoder = CommandDecoder::default();
    for part in [&data[..split], &data[split..]] {
        decoder.feed(part);
        while let Ok(Some(command)) = decoder.next_command() {
            assert!(!command.is_empty());
        }
    }
});
