//! permessage-deflate (RFC 7692) on the server side: which offers in a client's
//! `Sec-WebSocket-Extensions` Comet accepts, the answer it gives, and the bounded
//! inflation of a compressed client message.
//!
//! Comet always answers with `server_no_context_takeover` and `client_no_context_takeover`:
//! every message is compressed on its own, so one compressed frame serves every recipient
//! (`codec::deflate`), and a client message inflates with the shard's one inflater, reset
//! per message. No connection holds a deflate window, so an idle compressed client costs
//! what an uncompressed one does. An offer Comet cannot honour is declined and the
//! connection goes on uncompressed; it is never refused for it.
//!
//! Pure parsing and decompression; no I/O. The inflater never writes more than
//! `max_frame_size` bytes of output: a small frame that would inflate past it (a
//! decompression bomb) is stopped at the bound.

use std::cell::RefCell;

use flate2::{Decompress, FlushDecompress, Status};

use crate::codec::frame::FrameError;
use crate::codec::utf8::Utf8Validator;

/// The extension's registered name.
const NAME: &[u8] = b"permessage-deflate";
/// The answer to an accepted offer (a header line of the `101`).
pub const RESPONSE_HEADER: &str = "Sec-WebSocket-Extensions: permessage-deflate; \
                                   server_no_context_takeover; client_no_context_takeover\r\n";
/// What a sender strips from the end of each compressed message and the receiver puts
/// back (RFC 7692 section 7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Inflated bytes produced per step: the most memory a step takes, whatever the input.
const INFLATE_CHUNK: usize = 8 * 1024;
/// Offers examined in one header before the rest are ignored (a browser sends one or
/// two; the header itself is bounded by the 8 KiB request).
const MAX_OFFERS: usize = 16;

/// The outcome of reading a client's extension offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiation {
    /// No `permessage-deflate` offer at all.
    NotOffered,
    /// An offer Comet honours (the first such, in order).
    Accepted,
    /// Offers were made, none acceptable: why the first one was declined.
    Declined(OfferError),
}

/// Why an offer (or the whole header) was declined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("malformed Sec-WebSocket-Extensions: {0}")]
    Syntax(&'static str),
    #[error("parameter {0} appears twice")]
    Duplicate(String),
    #[error("unknown parameter {0}")]
    Unknown(String),
    #[error("bad value for {0}")]
    BadValue(String),
    #[error("server_max_window_bits={0}: Comet compresses with a 15-bit window only")]
    WindowTooSmall(u8),
}

/// Reads every `Sec-WebSocket-Extensions` value (a list may span several header fields)
/// and decides. Offers of other extensions are skipped; a header that does not parse is
/// declined as a whole (what it meant cannot be known).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Negotiation {
    let mut offers = Vec::new();
    for value in values {
        match parse_list(value) {
            Ok(more) => offers.extend(more.into_iter().filter(|o| o.name == NAME)),
            Err(err) => return Negotiation::Declined(err),
        }
    }
    let mut declined = None;
    for offer in offers.iter().take(MAX_OFFERS) {
        match check_offer(&offer.params) {
            Ok(()) => return Negotiation::Accepted,
            Err(err) => {
                declined.get_or_insert(err);
            }
        }
    }
    match declined {
        Some(err) => Negotiation::Declined(err),
        None => Negotiation::NotOffered,
    }
}

/// One extension of the list, its parameters as (name, value) with quoted values unquoted.
#[derive(Debug, PartialEq, Eq)]
struct Offer<'a> {
    name: &'a [u8],
    params: Vec<(&'a [u8], Option<Vec<u8>>)>,
}

/// RFC 7692 section 7.1: the parameters an offer may carry, each once, with valid values.
fn check_offer(params: &[(&[u8], Option<Vec<u8>>)]) -> Result<(), OfferError> {
    for (i, (name, value)) in params.iter().enumerate() {
        let shown = || String::from_utf8_lossy(name).into_owned();
        if params[..i].iter().any(|(earlier, _)| earlier == name) {
            return Err(OfferError::Duplicate(shown()));
        }
        match (*name, value.as_deref()) {
            (b"server_no_context_takeover" | b"client_no_context_takeover", None) => {}
            (b"server_no_context_takeover" | b"client_no_context_takeover", Some(_)) => {
                return Err(OfferError::BadValue(shown()));
            }
            (b"server_max_window_bits", Some(bits)) => match window_bits(bits) {
                Some(15) => {}
                Some(bits) => return Err(OfferError::WindowTooSmall(bits)),
                None => return Err(OfferError::BadValue(shown())),
            },
            (b"server_max_window_bits", None) => return Err(OfferError::BadValue(shown())),
            // The client tells what it can limit its window to; Comet inflates with a
            // 15-bit window, which reads whatever window the client compressed with.
            (b"client_max_window_bits", None) => {}
            (b"client_max_window_bits", Some(bits)) => {
                if window_bits(bits).is_none() {
                    return Err(OfferError::BadValue(shown()));
                }
            }
            _ => return Err(OfferError::Unknown(shown())),
        }
    }
    Ok(())
}

/// A window size: 8 to 15 in decimal, no leading zero (RFC 7692 section 7.1.2).
fn window_bits(value: &[u8]) -> Option<u8> {
    match value {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// RFC 6455 section 9.1 / RFC 9110 section 5.6: `extension *( ";" param [ "=" value ] )`,
/// comma-separated, optional whitespace around separators, empty elements allowed,
/// values tokens or quoted strings.
fn parse_list(value: &[u8]) -> Result<Vec<Offer<'_>>, OfferError> {
    let mut lexer = Lexer { rest: value };
    let mut offers = Vec::new();
    loop {
        lexer.skip_ows();
        if lexer.rest.is_empty() {
            return Ok(offers);
        }
        if lexer.eat(b',') {
            continue;
        }
        let name = lexer
            .token()
            .ok_or(OfferError::Syntax("expected an extension name"))?;
        let mut params = Vec::new();
        loop {
            lexer.skip_ows();
            if lexer.rest.is_empty() || lexer.eat(b',') {
                break;
            }
            if !lexer.eat(b';') {
                return Err(OfferError::Syntax("expected `;` or `,`"));
            }
            lexer.skip_ows();
            let param = lexer
                .token()
                .ok_or(OfferError::Syntax("expected a parameter name"))?;
            lexer.skip_ows();
            let value = if lexer.eat(b'=') {
                lexer.skip_ows();
                Some(lexer.value()?)
            } else {
                None
            };
            params.push((param, value));
        }
        offers.push(Offer { name, params });
    }
}

struct Lexer<'a> {
    rest: &'a [u8],
}

impl<'a> Lexer<'a> {
    fn skip_ows(&mut self) {
        while let [b' ' | b'\t', rest @ ..] = self.rest {
            self.rest = rest;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        match self.rest.split_first() {
            Some((&first, rest)) if first == byte => {
                self.rest = rest;
                true
            }
            _ => false,
        }
    }

    fn token(&mut self) -> Option<&'a [u8]> {
        let len = self.rest.iter().take_while(|&&b| is_tchar(b)).count();
        let (token, rest) = self.rest.split_at(len);
        self.rest = rest;
        (len > 0).then_some(token)
    }

    /// A token, or a quoted string whose unescaped content must itself be a token
    /// (RFC 6455 section 9.1).
    fn value(&mut self) -> Result<Vec<u8>, OfferError> {
        if !self.eat(b'"') {
            return self
                .token()
                .map(<[u8]>::to_vec)
                .ok_or(OfferError::Syntax("expected a parameter value"));
        }
        let mut unquoted = Vec::new();
        loop {
            match self.rest {
                [b'"', rest @ ..] => {
                    self.rest = rest;
                    break;
                }
                [b'\\', escaped, rest @ ..] => {
                    unquoted.push(*escaped);
                    self.rest = rest;
                }
                [byte, rest @ ..] if *byte != b'\\' => {
                    unquoted.push(*byte);
                    self.rest = rest;
                }
                _ => return Err(OfferError::Syntax("unterminated quoted string")),
            }
        }
        if unquoted.is_empty() || !unquoted.iter().all(|&b| is_tchar(b)) {
            return Err(OfferError::Syntax("a quoted value must be a token"));
        }
        Ok(unquoted)
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

thread_local! {
    /// The shard's inflater, reset before each message (client_no_context_takeover):
    /// one per thread, never one per connection.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Inflates one compressed client message (its frames' payloads joined), checking on the
/// way that it stays within `limit` bytes and, for a Text message, that it is UTF-8. The
/// output is checked and dropped (clients' messages are not routed anywhere, as in the
/// original); at most [`INFLATE_CHUNK`] bytes of it exist at a time.
pub fn inflate_checked(compressed: &[u8], limit: usize, text: bool) -> Result<(), FrameError> {
    INFLATER.with(|cell| {
        let mut inflater = cell.borrow_mut();
        inflater.reset(false);
        let mut utf8 = Utf8Validator::default();
        let mut produced = 0usize;
        let mut chunk = [0u8; INFLATE_CHUNK];
        for input in [compressed, &TAIL[..]] {
            let mut input = input;
            loop {
                let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
                let status = inflater
                    .decompress(input, &mut chunk, FlushDecompress::Sync)
                    .map_err(|_| FrameError::BadCompression)?;
                let used = (inflater.total_in() - in_before) as usize;
                let made = (inflater.total_out() - out_before) as usize;
                input = &input[used..];
                produced = produced.saturating_add(made);
                if produced > limit {
                    return Err(FrameError::TooBig {
                        size: produced as u64,
                        limit,
                    });
                }
                if text {
                    utf8.feed(&chunk[..made])?;
                }
                if status == Status::StreamEnd {
                    // A final block ends the message; nothing after it counts.
                    return finish(&mut utf8, text);
                }
                let stalled = used == 0 && made == 0;
                if (input.is_empty() && made < chunk.len()) || stalled {
                    break;
                }
            }
        }
        finish(&mut utf8, text)
    })
}

fn finish(utf8: &mut Utf8Validator, text: bool) -> Result<(), FrameError> {
    if text {
        utf8.finish()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame::close_code;

    fn offers(values: &[&str]) -> Negotiation {
        negotiate(values.iter().map(|v| v.as_bytes()))
    }

    fn declined(value: &str) -> OfferError {
        match offers(&[value]) {
            Negotiation::Declined(err) => err,
            other => panic!("{value:?}: {other:?}"),
        }
    }

    #[test]
    fn what_browsers_and_libraries_offer_is_accepted() {
        for value in [
            // Chromium, Firefox
            "permessage-deflate; client_max_window_bits",
            // Python websockets
            "permessage-deflate; server_max_window_bits=15; client_max_window_bits",
            // Node ws
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate;client_max_window_bits=10",
            "permessage-deflate; client_max_window_bits=\"12\"",
            "  permessage-deflate  ;  client_max_window_bits = 8 ",
        ] {
            assert_eq!(offers(&[value]), Negotiation::Accepted, "{value:?}");
        }
    }

    #[test]
    fn no_offer_is_not_offered() {
        assert_eq!(offers(&[]), Negotiation::NotOffered);
        assert_eq!(offers(&[""]), Negotiation::NotOffered);
        assert_eq!(offers(&["x-webkit-deflate-frame"]), Negotiation::NotOffered);
        assert_eq!(offers(&[" , ,"]), Negotiation::NotOffered);
    }

    #[test]
    fn duplicate_parameters_are_declined() {
        assert_eq!(
            declined("permessage-deflate; client_max_window_bits; client_max_window_bits=9"),
            OfferError::Duplicate("client_max_window_bits".into())
        );
        assert_eq!(
            declined("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            OfferError::Duplicate("server_no_context_takeover".into())
        );
    }

    #[test]
    fn bad_values_are_declined() {
        for value in [
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; client_max_window_bits=\"1\"",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=true",
        ] {
            assert!(
                matches!(declined(value), OfferError::BadValue(_)),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_smaller_server_window_and_unknown_parameters_are_declined() {
        assert_eq!(
            declined("permessage-deflate; server_max_window_bits=10"),
            OfferError::WindowTooSmall(10)
        );
        assert_eq!(
            declined("permessage-deflate; mux"),
            OfferError::Unknown("mux".into())
        );
    }

    #[test]
    fn the_first_acceptable_of_several_offers_wins() {
        let value = "permessage-deflate; server_max_window_bits=9, \
                     permessage-deflate; client_max_window_bits";
        assert_eq!(offers(&[value]), Negotiation::Accepted);
        // Across header fields too, and other extensions in between are skipped.
        assert_eq!(
            offers(&[
                "permessage-deflate; bogus",
                "foo; bar=1, permessage-deflate"
            ]),
            Negotiation::Accepted
        );
        // All unacceptable: the first one's reason.
        assert_eq!(
            offers(&["permessage-deflate; a, permessage-deflate; b"]),
            Negotiation::Declined(OfferError::Unknown("a".into()))
        );
    }

    #[test]
    fn malformed_headers_are_declined_as_a_whole() {
        for value in [
            "permessage-deflate; ",
            "permessage-deflate;; client_max_window_bits",
            "permessage-deflate client_max_window_bits",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; client_max_window_bits=\"10",
            "permessage-deflate; client_max_window_bits=\"1 0\"",
            "permessage-deflate; client_max_window_bits=\"\"",
            "=x",
            "permessage-deflate\u{e9}",
        ] {
            assert!(
                matches!(declined(value), OfferError::Syntax(_)),
                "{value:?}"
            );
        }
        // A bad header beside a good one: nothing is certain, decline.
        assert!(matches!(
            offers(&["permessage-deflate", "permessage-deflate;;"]),
            Negotiation::Declined(OfferError::Syntax(_))
        ));
    }

    #[test]
    fn quoted_values_are_unescaped() {
        assert_eq!(
            offers(&["permessage-deflate; client_max_window_bits=\"1\\2\""]),
            Negotiation::Accepted
        );
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        crate::codec::deflate::compress(data, 6).unwrap()
    }

    #[test]
    fn a_compressed_message_inflates_and_is_checked() {
        let text = "héllo ".repeat(100);
        inflate_checked(&deflate(text.as_bytes()), 700, true).unwrap();
        let bad = deflate(b"ok \xff");
        assert_eq!(
            inflate_checked(&bad, 600, true).unwrap_err().close_code(),
            close_code::INVALID_PAYLOAD
        );
        // Binary: any bytes.
        inflate_checked(&bad, 600, false).unwrap();
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = deflate(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 20 << 10, "{}", bomb.len());
        let err = inflate_checked(&bomb, 512, false).unwrap_err();
        assert_eq!(err.close_code(), close_code::TOO_BIG);
        // Exactly at the limit is fine.
        inflate_checked(&deflate(&[b'a'; 512]), 512, false).unwrap();
    }

    #[test]
    fn garbage_is_a_bad_payload_not_a_panic() {
        let err = inflate_checked(&[0xff; 40], 512, false).unwrap_err();
        assert_eq!(err, FrameError::BadCompression);
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
        // An empty message (RFC 7692 section 7.2.3.6) inflates to nothing.
        inflate_checked(&[0x00], 512, true).unwrap();
        inflate_checked(&[], 512, true).unwrap();
    }

    /// A fixed-Huffman block (RFC 1951 section 3.2.6) of `codes`, each a (symbol's
    /// 7-bit length/end code, distance code) pair: bits go LSB first, Huffman codes MSB
    /// first.
    fn fixed_block(codes: &[(u8, Option<u8>)]) -> Vec<u8> {
        let mut bits = vec![1, 1, 0]; // BFINAL, BTYPE = 01
        let mut huffman = |code: u8, len: u32| {
            bits.extend((0..len).rev().map(|i| (code >> i) & 1));
        };
        for &(symbol, distance) in codes {
            huffman(symbol, 7);
            if let Some(distance) = distance {
                huffman(distance, 5);
            }
        }
        huffman(0, 7); // end of block (256)
        bits.chunks(8)
            .map(|byte| byte.iter().rev().fold(0, |acc, &bit| acc << 1 | bit))
            .collect()
    }

    #[test]
    fn a_reference_before_the_start_of_the_message_is_a_bad_payload() {
        // Length 3 (code 257), distance 1 (code 0), as the very first symbol: there is
        // nothing to copy from (no context takeover), so no byte may come out of it.
        let block = fixed_block(&[(1, Some(0))]);
        let err = inflate_checked(&block, 512, false).unwrap_err();
        assert_eq!(err, FrameError::BadCompression);
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn the_inflater_is_reset_between_messages() {
        // A message that refers back into an earlier one would need context takeover.
        inflate_checked(&deflate(b"abc"), 10, true).unwrap();
        inflate_checked(&deflate(b"\xff"), 10, false).unwrap();
        inflate_checked(&deflate(b"abc"), 10, true).unwrap();
    }
}
