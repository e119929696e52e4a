//! The permessage-deflate wire format of a pushed message (RFC 7692): the payload
//! compressed on its own (no context taken over from earlier messages), so that one
//! compressed frame serves every recipient that negotiated the extension, on every shard.
//!
//! Owns only compression. Each shard thread keeps one compressor, reset per message;
//! no connection ever holds one. Negotiation and inflation are the WebSocket
//! transport's (`transport/ws/deflate`).

use std::cell::RefCell;

use flate2::{Compress, Compression, FlushCompress};

use crate::codec::frame::EncodedFrame;

/// What every sync-flushed message ends with, which the sender strips (RFC 7692
/// section 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// How pushes are compressed for the sessions that negotiated permessage-deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// zlib's level, 1 (fastest) to 9 (smallest).
    pub level: u8,
    /// Smaller payloads go uncompressed (RSV1 clear): below a few hundred bytes the
    /// deflate block header and a Huffman table cost about what they save.
    pub min_size: u32,
}

thread_local! {
    /// This thread's compressor (a deflate state is a few hundred KiB: made once, reset per
    /// message rather than allocated per message).
    static COMPRESSOR: RefCell<Option<(u8, Compress)>> = const { RefCell::new(None) };
}

/// `payload` deflated as one message without context takeover, the trailing
/// `00 00 ff ff` removed. `None` only if the compressor failed.
pub fn compress(payload: &[u8], level: u8) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match &mut *slot {
            Some((made_at, compressor)) if *made_at == level => {
                compressor.reset();
                compressor
            }
            _ => {
                let fresh = Compress::new(Compression::new(u32::from(level)), false);
                &mut slot.insert((level, fresh)).1
            }
        };
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let start = compressor.total_in();
        loop {
            let consumed = (compressor.total_in() - start) as usize;
            compressor
                .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            let done = (compressor.total_in() - start) as usize == payload.len();
            if done && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        let body = out.len().checked_sub(TAIL.len())?;
        (out[body..] == TAIL).then(|| {
            out.truncate(body);
            out
        })
    })
}

/// Larger payloads go uncompressed: compression runs on the shard that first sends the
/// message, and holds that shard's other clients meanwhile (measured at level 6: 87 ms for
/// 4 MiB, 263 ms for 12 MiB; level 9: 228 ms and 648 ms). At 1 MiB that is ~20-50 ms.
pub const MAX_COMPRESSED_PAYLOAD: usize = 1 << 20;

/// The compressed frame for `payload`, or `None` when it goes as a plain Text frame:
/// under `min_size`, or not made smaller by compression.
pub fn frame(payload: &[u8], settings: Deflate) -> Option<EncodedFrame> {
    if payload.len() < settings.min_size as usize || payload.len() > MAX_COMPRESSED_PAYLOAD {
        return None;
    }
    let compressed = compress(payload, settings.level)?;
    (compressed.len() < payload.len()).then(|| EncodedFrame::compressed_text(&compressed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflate(compressed: &[u8]) -> Vec<u8> {
        let mut input = compressed.to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 20);
        Decompress::new(false)
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn messages_round_trip_and_do_not_depend_on_each_other() {
        let json = br#"{"type":"price","symbol":"ABC","bid":101.25,"ask":101.5}"#.repeat(40);
        let first = compress(&json, 6).unwrap();
        let second = compress(&json, 6).unwrap();
        // No context takeover: the same message compresses to the same bytes each time.
        assert_eq!(first, second);
        assert_eq!(inflate(&first), json);
        assert!(
            first.len() * 5 < json.len(),
            "{} of {}",
            first.len(),
            json.len()
        );
        // A level change takes a new compressor; the result still inflates.
        assert_eq!(inflate(&compress(&json, 1).unwrap()), json);
        assert_eq!(inflate(&compress(b"", 6).unwrap()), b"");
        // Larger than one output reservation.
        let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(inflate(&compress(&big, 9).unwrap()), big);
    }

    #[test]
    fn small_or_incompressible_payloads_go_plain() {
        let settings = Deflate {
            level: 6,
            min_size: 256,
        };
        assert!(frame(&[b'a'; 255], settings).is_none());
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..1000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert!(frame(&random, settings).is_none());
        let frame = frame(&[b'a'; 256], settings).unwrap();
        // FIN, RSV1, Text.
        assert_eq!(frame.bytes()[0], 0xC1);
        assert_eq!(inflate(frame.payload()), [b'a'; 256]);
    }
}
