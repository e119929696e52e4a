//! Incremental UTF-8 validation of a Text message that arrives in fragments (RFC 6455
//! section 8.1: a Text message that is not UTF-8 fails the connection with 1007).
//!
//! Each fragment is checked as soon as it is decoded, so an invalid message fails on its
//! first bad fragment rather than once it is complete. The only state carried from one
//! fragment to the next is a code point cut by the fragment boundary: at most 3 bytes, so
//! the check adds nothing that grows with the message.

/// Why a Text payload is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Utf8Error {
    /// A byte sequence that no continuation can make valid.
    #[error("text message is not valid UTF-8")]
    Invalid,
    /// The message ended inside a multi-byte character.
    #[error("text message ends inside a UTF-8 character")]
    Truncated,
}

/// The validator's state between fragments: the start of a code point that the last
/// fragment cut (1 to 3 bytes, which `std` has already found to be a valid prefix).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Utf8Validator {
    tail: [u8; 3],
    tail_len: u8,
}

impl Utf8Validator {
    /// Checks the next fragment's bytes, carrying a code point it ends inside of.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Utf8Error> {
        if self.tail_len > 0 {
            bytes = self.complete_tail(bytes)?;
            if self.tail_len > 0 {
                // The fragment was too short to finish the carried code point.
                return Ok(());
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(err) if err.error_len().is_some() => Err(Utf8Error::Invalid),
            // A valid prefix cut by the fragment's end: at most 3 bytes by construction.
            Err(err) => {
                self.carry(&bytes[err.valid_up_to()..]);
                Ok(())
            }
        }
    }

    /// Ends the message: a code point still open is a truncated character.
    pub fn finish(&mut self) -> Result<(), Utf8Error> {
        let open = self.tail_len > 0;
        *self = Utf8Validator::default();
        if open {
            Err(Utf8Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// Finishes the carried code point with the first bytes of `bytes`; returns what is
    /// left of `bytes` once it is complete (everything consumed if it is still open).
    fn complete_tail<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], Utf8Error> {
        let have = usize::from(self.tail_len);
        let take = (4 - have).min(bytes.len());
        let mut joined = [0u8; 4];
        joined[..have].copy_from_slice(&self.tail[..have]);
        joined[have..have + take].copy_from_slice(&bytes[..take]);
        let joined = &joined[..have + take];
        let consumed = match std::str::from_utf8(joined) {
            Ok(_) => take,
            // The carried code point completed (and maybe more): go on after it.
            Err(err) if err.valid_up_to() > 0 => err.valid_up_to() - have,
            Err(err) if err.error_len().is_some() => return Err(Utf8Error::Invalid),
            // Still a valid prefix: `bytes` was shorter than the code point's rest.
            Err(_) => {
                self.carry(joined);
                return Ok(&[]);
            }
        };
        self.tail_len = 0;
        Ok(&bytes[consumed..])
    }

    fn carry(&mut self, prefix: &[u8]) {
        debug_assert!(!prefix.is_empty() && prefix.len() <= 3);
        let len = prefix.len().min(3);
        self.tail[..len].copy_from_slice(&prefix[..len]);
        self.tail_len = len as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Validates `bytes` cut at `cuts`, as fragments.
    fn fragmented(bytes: &[u8], cuts: &[usize]) -> Result<(), Utf8Error> {
        let mut validator = Utf8Validator::default();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            validator.feed(&bytes[start..cut])?;
            start = cut;
        }
        validator.finish()
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut samples: Vec<Vec<u8>> = [
            "",
            "hello",
            "κόσμε",
            "\u{7f}\u{80}\u{7ff}\u{800}\u{ffff}\u{10000}\u{10ffff}",
            "a€b𝄞c",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        for invalid in [
            &b"\xff"[..],
            b"\xc0\xaf",                 // overlong '/'
            b"\xe0\x80\xaf",             // overlong
            b"\xed\xa0\x80",             // surrogate U+D800
            b"\xf4\x90\x80\x80",         // above U+10FFFF
            b"\xce\xba\xe1\xbd\xb9\xcf", // ends mid-character
            b"\xf0\x9f\x98",             // truncated 4-byte
            b"a\x80b",                   // lone continuation
            b"\xce\xbaa\xbd\xb9",        // continuation after ASCII
            b"\xf0\x9f(\x98",            // bad continuation mid-sequence
        ] {
            samples.push(invalid.to_vec());
            let mut wrapped = b"valid \xe2\x82\xac ".to_vec();
            wrapped.extend_from_slice(invalid);
            wrapped.extend_from_slice(b" \xf0\x9d\x84\x9e");
            samples.push(wrapped);
        }
        samples
    }

    #[test]
    fn agrees_with_std_at_every_one_and_two_cut_split() {
        for bytes in samples() {
            let whole_ok = std::str::from_utf8(&bytes).is_ok();
            for a in 0..=bytes.len() {
                assert_eq!(
                    fragmented(&bytes, &[a]).is_ok(),
                    whole_ok,
                    "{bytes:?} cut at {a}"
                );
                for b in a..=bytes.len() {
                    assert_eq!(
                        fragmented(&bytes, &[a, b]).is_ok(),
                        whole_ok,
                        "{bytes:?} cut at {a}, {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn byte_at_a_time_agrees_with_std() {
        for bytes in samples() {
            let cuts: Vec<usize> = (1..bytes.len()).collect();
            assert_eq!(
                fragmented(&bytes, &cuts).is_ok(),
                std::str::from_utf8(&bytes).is_ok(),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn fails_on_the_first_bad_fragment_not_at_the_end() {
        let mut validator = Utf8Validator::default();
        assert_eq!(validator.feed(b"ok \xff"), Err(Utf8Error::Invalid));
        // A surrogate's first two bytes are refused before a third could arrive.
        let mut validator = Utf8Validator::default();
        assert_eq!(validator.feed(b"\xed\xa0"), Err(Utf8Error::Invalid));
        // Bad bytes split across fragments fail on the fragment that completes them.
        let mut validator = Utf8Validator::default();
        assert_eq!(validator.feed(b"\xf0\x9f"), Ok(()));
        assert_eq!(validator.feed(b"(more"), Err(Utf8Error::Invalid));
    }

    #[test]
    fn a_message_ending_mid_character_is_truncated() {
        let mut validator = Utf8Validator::default();
        assert_eq!(validator.feed(b"\xe2\x82"), Ok(()));
        assert_eq!(validator.finish(), Err(Utf8Error::Truncated));
        // finish resets: the next message starts clean.
        assert_eq!(validator.feed(b"ok"), Ok(()));
        assert_eq!(validator.finish(), Ok(()));
    }

    #[test]
    fn carries_at_most_three_bytes() {
        let mut validator = Utf8Validator::default();
        for byte in b"\xf0\x9f\x98" {
            validator.feed(std::slice::from_ref(byte)).unwrap();
            assert!(validator.tail_len <= 3);
        }
        validator.feed(b"\x80").unwrap();
        assert_eq!(validator.tail_len, 0);
        assert_eq!(std::mem::size_of::<Utf8Validator>(), 4);
    }
}
