//! WebSocket framing (RFC 6455) for the server side: encoding outbound frames once so that
//! their bytes can be shared by every recipient, and decoding a client's masked frames
//! incrementally with a hard bound on what is buffered.
//!
//! Header parsing is tungstenite's ([`FrameHeader::parse`]); this module adds the rules a
//! server enforces (masking, size limits, control-frame limits) and never allocates more
//! than one frame's worth of bytes per connection. It does no I/O.

use std::io::Cursor;

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use super::utf8::{Utf8Error, Utf8Validator};

/// Largest payload of a control frame (RFC 6455 section 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest frame header a client can send.
const MAX_HEADER: usize = 14;

/// Close codes this server sends, and which ones a client may send.
pub mod close_code {
    /// The connection has served its purpose (kick, replaced).
    pub const NORMAL: u16 = 1000;
    /// The server is going down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the framing rules.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A Text message (or a close reason) that is not UTF-8 (RFC 6455 section 8.1).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client broke a policy (it stopped reading: slow consumer).
    pub const POLICY: u16 = 1008;
    /// The client sent a message larger than `max_frame_size`.
    pub const TOO_BIG: u16 = 1009;

    /// Whether a peer may send `code` in a Close frame (RFC 6455 section 7.4): the
    /// defined codes except those reserved for "no code" (1005), "abnormal" (1006) and
    /// "TLS failure" (1015), which never go on the wire; the registered 1012-1014; and
    /// 3000-4999 for libraries and applications. Everything else is a protocol error.
    pub fn is_valid(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// A complete outbound frame (header + payload), built once and shared by every
/// recipient's bytes.
#[derive(Debug)]
pub struct EncodedFrame {
    bytes: Box<[u8]>,
    payload_at: usize,
}

impl EncodedFrame {
    /// An unmasked, final Text frame carrying `payload`.
    pub fn text(payload: &[u8]) -> EncodedFrame {
        EncodedFrame::build(OpCode::Data(Data::Text), payload)
    }

    /// A Ping frame with an empty payload.
    pub fn ping() -> EncodedFrame {
        EncodedFrame::build(OpCode::Control(Control::Ping), &[])
    }

    /// A Pong frame echoing `payload` (at most 125 bytes, as the decoder guarantees).
    pub fn pong(payload: &[u8]) -> EncodedFrame {
        EncodedFrame::build(OpCode::Control(Control::Pong), payload)
    }

    /// A Close frame with a status code and a short reason.
    pub fn close(code: u16, reason: &str) -> EncodedFrame {
        let reason = truncate_utf8(reason, MAX_CONTROL_PAYLOAD - 2);
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        EncodedFrame::build(OpCode::Control(Control::Close), &payload)
    }

    /// A final Text frame with RSV1 set: `deflated` is the message compressed as
    /// permessage-deflate says (RFC 7692 section 7.2.1).
    pub fn compressed_text(deflated: &[u8]) -> EncodedFrame {
        EncodedFrame::build_with(OpCode::Data(Data::Text), true, deflated)
    }

    fn build(opcode: OpCode, payload: &[u8]) -> EncodedFrame {
        EncodedFrame::build_with(opcode, false, payload)
    }

    fn build_with(opcode: OpCode, rsv1: bool, payload: &[u8]) -> EncodedFrame {
        let header = FrameHeader {
            opcode,
            rsv1,
            ..FrameHeader::default()
        };
        let length = payload.len() as u64;
        let mut bytes = Vec::with_capacity(header.len(length) + payload.len());
        header
            .format(length, &mut bytes)
            .expect("formatting into a Vec cannot fail");
        let payload_at = bytes.len();
        bytes.extend_from_slice(payload);
        EncodedFrame {
            bytes: bytes.into_boxed_slice(),
            payload_at,
        }
    }

    /// The wire bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The payload (what the application sees).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.payload_at..]
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What a client sent, one complete frame at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A data frame's payload (unmasked); `fin` ends the message. `text`: the frame is
    /// part of a Text message, whose bytes have been checked as UTF-8 so far (and, at
    /// `fin`, as a whole), unless `compressed`: the message is permessage-deflate data
    /// (RSV1 on its first frame), checked by whoever inflates it.
    Data {
        payload: Vec<u8>,
        fin: bool,
        text: bool,
        compressed: bool,
    },
    /// A ping; the payload must be echoed in a pong.
    Ping(Vec<u8>),
    /// A pong (an answer to our heartbeat).
    Pong,
    /// The client is closing, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why a client's bytes were refused; each maps to the close code the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooBig { size: u64, limit: usize },
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("protocol violation: close code {0} is not allowed")]
    BadCloseCode(u16),
    #[error("{0}")]
    InvalidUtf8(&'static str),
    #[error("compressed message is not valid deflate data")]
    BadCompression,
}

impl From<Utf8Error> for FrameError {
    fn from(err: Utf8Error) -> FrameError {
        FrameError::InvalidUtf8(match err {
            Utf8Error::Invalid => "text message is not valid UTF-8",
            Utf8Error::Truncated => "text message ends inside a UTF-8 character",
        })
    }
}

impl FrameError {
    /// The close code that tells the client what it did wrong.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooBig { .. } => close_code::TOO_BIG,
            FrameError::Protocol(_) | FrameError::BadCloseCode(_) => close_code::PROTOCOL_ERROR,
            FrameError::InvalidUtf8(_) | FrameError::BadCompression => close_code::INVALID_PAYLOAD,
        }
    }
}

/// What a session's frames are judged by.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Largest message, in bytes on the wire (and, inflated, after decompression).
    pub max_message: usize,
    /// permessage-deflate was negotiated: a data message may start with RSV1 set.
    pub deflate: bool,
}

/// Incremental decoder of client frames. Holds at most one incomplete frame, whose size
/// is bounded by `max_message` before any of its payload is buffered.
///
/// It is part of every idle connection's task, so its state stays small (40 bytes): the
/// flags and the UTF-8 carry-over fit in what the `Vec` and the length leave as padding.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Vec<u8>,
    message_len: u64,
    in_message: bool,
    /// The message in progress is Text: its fragments are checked as UTF-8.
    text: bool,
    /// The client's Close has been decoded: it is the last frame that counts (RFC 6455
    /// section 5.5.1), whatever follows it is ignored.
    closed: bool,
    /// The message in progress is compressed (RSV1 on its first frame).
    compressed: bool,
    utf8: Utf8Validator,
}

impl Decoder {
    /// Feeds newly read bytes; calls `on_frame` for every complete frame, judged by
    /// `rules` (the size bound, and whether a data message may start with RSV1 set).
    pub fn feed(
        &mut self,
        data: &[u8],
        rules: Rules,
        mut on_frame: impl FnMut(Inbound),
    ) -> Result<(), FrameError> {
        let Rules {
            max_message,
            deflate,
        } = rules;
        if self.closed {
            return Ok(());
        }
        if self.partial.is_empty() {
            let used = self.decode_all(data, max_message, deflate, &mut on_frame)?;
            self.partial.extend_from_slice(&data[used..]);
        } else {
            let mut pending = std::mem::take(&mut self.partial);
            pending.extend_from_slice(data);
            let used = self.decode_all(&pending, max_message, deflate, &mut on_frame)?;
            pending.drain(..used);
            self.partial = pending;
        }
        if self.partial.is_empty() {
            // Give back the capacity an earlier partial frame needed: idle clients hold nothing.
            self.partial = Vec::new();
        }
        Ok(())
    }

    /// Bytes held for an incomplete frame (at most its header and `max_message`).
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    fn decode_all(
        &mut self,
        data: &[u8],
        max_message: usize,
        deflate: bool,
        on_frame: &mut impl FnMut(Inbound),
    ) -> Result<usize, FrameError> {
        let mut used = 0;
        while used < data.len() {
            match self.decode_one(&data[used..], max_message, deflate)? {
                Some((frame, consumed)) => {
                    used += consumed;
                    let close = matches!(frame, Inbound::Close(_));
                    on_frame(frame);
                    if close {
                        // Nothing after the client's Close is answered or judged: drop it.
                        self.closed = true;
                        return Ok(data.len());
                    }
                }
                None => break,
            }
        }
        Ok(used)
    }

    fn decode_one(
        &mut self,
        data: &[u8],
        max_message: usize,
        deflate: bool,
    ) -> Result<Option<(Inbound, usize)>, FrameError> {
        let mut cursor = Cursor::new(data);
        let (header, length) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) if data.len() >= MAX_HEADER => {
                return Err(FrameError::Protocol("unparseable frame header"));
            }
            Ok(None) => return Ok(None),
            Err(_) => return Err(FrameError::Protocol("invalid frame header")),
        };
        self.check_header(&header, length, max_message, deflate)?;
        let header_len = cursor.position() as usize;
        let Some(end) = header_len.checked_add(length as usize) else {
            return Err(FrameError::TooBig {
                size: length,
                limit: max_message,
            });
        };
        if data.len() < end {
            return Ok(None);
        }
        let mut payload = data[header_len..end].to_vec();
        if let Some(mask) = header.mask {
            unmask(&mut payload, mask);
        }
        Ok(Some((self.classify(header, payload)?, end)))
    }

    fn check_header(
        &mut self,
        header: &FrameHeader,
        length: u64,
        max_message: usize,
        deflate: bool,
    ) -> Result<(), FrameError> {
        if length > i64::MAX as u64 {
            // Section 5.2: the most significant bit of a 64-bit length must be 0; this is
            // a malformed header, not merely a big message.
            return Err(FrameError::Protocol(
                "64-bit payload length with the most significant bit set",
            ));
        }
        if header.mask.is_none() {
            return Err(FrameError::Protocol("client frames must be masked"));
        }
        if header.rsv2 || header.rsv3 || (header.rsv1 && !deflate) {
            return Err(FrameError::Protocol(
                "reserved bits set without an extension",
            ));
        }
        // RFC 7692 section 6: RSV1 marks a compressed message on its first frame only,
        // never on a control frame or a continuation.
        if header.rsv1 {
            match header.opcode {
                OpCode::Control(_) => {
                    return Err(FrameError::Protocol("RSV1 set on a control frame"));
                }
                OpCode::Data(Data::Continue) => {
                    return Err(FrameError::Protocol("RSV1 set on a continuation frame"));
                }
                OpCode::Data(_) => {}
            }
        }
        match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(FrameError::Protocol("reserved opcode"))
            }
            OpCode::Control(_) if length as usize > MAX_CONTROL_PAYLOAD || !header.is_final => Err(
                FrameError::Protocol("control frames must be final and at most 125 bytes"),
            ),
            OpCode::Control(_) => Ok(()),
            OpCode::Data(data) => {
                let continues = data == Data::Continue;
                if continues != self.in_message {
                    return Err(FrameError::Protocol(if continues {
                        "continuation frame without a message to continue"
                    } else {
                        "new message before the previous one was finished"
                    }));
                }
                let size = if continues { self.message_len } else { 0 }.saturating_add(length);
                if size > max_message as u64 {
                    return Err(FrameError::TooBig {
                        size,
                        limit: max_message,
                    });
                }
                Ok(())
            }
        }
    }

    fn classify(&mut self, header: FrameHeader, payload: Vec<u8>) -> Result<Inbound, FrameError> {
        Ok(match header.opcode {
            OpCode::Data(data) => {
                let starts = data != Data::Continue;
                if starts {
                    self.text = data == Data::Text;
                    self.compressed = header.rsv1;
                }
                if self.text && !self.compressed {
                    self.check_text(&payload, header.is_final)?;
                }
                let base = if starts { 0 } else { self.message_len };
                self.message_len = base + payload.len() as u64;
                self.in_message = !header.is_final;
                if header.is_final {
                    self.message_len = 0;
                }
                Inbound::Data {
                    payload,
                    fin: header.is_final,
                    text: self.text,
                    compressed: self.compressed,
                }
            }
            OpCode::Control(Control::Ping) => Inbound::Ping(payload),
            OpCode::Control(Control::Pong) => Inbound::Pong,
            OpCode::Control(Control::Close) => Inbound::Close(close_status(&payload)?),
            OpCode::Control(Control::Reserved(_)) => {
                return Err(FrameError::Protocol("reserved opcode"));
            }
        })
    }

    /// Section 8.1: a Text fragment is checked as it arrives, so that a bad message fails
    /// on its first bad fragment; only a code point cut by the fragment's end carries over.
    fn check_text(&mut self, payload: &[u8], fin: bool) -> Result<(), FrameError> {
        self.utf8.feed(payload)?;
        if fin {
            self.utf8.finish()?;
        }
        Ok(())
    }
}

/// A Close payload: nothing, or a code a peer may send followed by a UTF-8 reason.
fn close_status(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code::is_valid(code) {
                return Err(FrameError::BadCloseCode(code));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(FrameError::InvalidUtf8("close reason is not valid UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn decode(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Inbound>, FrameError> {
        decode_with(decoder, bytes, false)
    }

    fn decode_with(
        decoder: &mut Decoder,
        bytes: &[u8],
        deflate: bool,
    ) -> Result<Vec<Inbound>, FrameError> {
        let mut frames = Vec::new();
        let rules = Rules {
            max_message: 512,
            deflate,
        };
        decoder.feed(bytes, rules, |f| frames.push(f))?;
        Ok(frames)
    }

    #[test]
    fn rsv1_marks_a_compressed_message_only_when_negotiated() {
        let mut bytes = client_frame(0x41, b"\xffcompressed");
        bytes.extend(client_frame(0x80, b"rest"));
        bytes.extend(client_frame(0x81, b"plain"));
        let frames = decode_with(&mut Decoder::default(), &bytes, true).unwrap();
        let flags: Vec<(bool, bool)> = frames
            .iter()
            .map(|f| match f {
                Inbound::Data {
                    fin, compressed, ..
                } => (*fin, *compressed),
                other => panic!("{other:?}"),
            })
            .collect();
        // Not UTF-8 checked while compressed; the flag lasts the message, then clears.
        assert_eq!(flags, [(false, true), (true, true), (true, false)]);
        // Without negotiation RSV1 is a protocol error.
        let err = refusal(&client_frame(0xC1, b"x"));
        assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
    }

    #[test]
    fn rsv1_on_a_control_frame_or_a_continuation_is_1002() {
        for bytes in [
            client_frame(0xC9, b"ping"),
            client_frame(0xC8, &1000u16.to_be_bytes()),
            client_frame(0xCA, b""),
            [client_frame(0x01, b"a"), client_frame(0xC0, b"b")].concat(),
        ] {
            let err = decode_with(&mut Decoder::default(), &bytes, true).unwrap_err();
            assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR, "{bytes:x?}");
        }
        // RSV2 and RSV3 stay reserved.
        let err = decode_with(&mut Decoder::default(), &client_frame(0xE1, b"x"), true);
        assert_eq!(err.unwrap_err().close_code(), close_code::PROTOCOL_ERROR);
    }

    #[test]
    fn text_frame_is_unmasked() {
        let frames = decode(&mut Decoder::default(), &client_frame(0x81, b"hello")).unwrap();
        assert_eq!(
            frames,
            vec![Inbound::Data {
                payload: b"hello".to_vec(),
                fin: true,
                text: true,
                compressed: false,
            }]
        );
    }

    #[test]
    fn frame_split_across_reads_is_reassembled() {
        let bytes = client_frame(0x81, b"split me");
        let mut decoder = Decoder::default();
        for chunk in bytes.chunks(3).take(bytes.len() / 3) {
            assert!(decode(&mut decoder, chunk).unwrap().is_empty());
        }
        let rest = &bytes[(bytes.len() / 3) * 3..];
        let frames = decode(&mut decoder, rest).unwrap();
        assert_eq!(frames.len(), 1);
        assert!(decoder.partial.is_empty());
    }

    #[test]
    fn oversized_message_is_refused_from_its_header() {
        let header_only = &client_frame(0x81, &[b'x'; 600])[..8];
        let err = decode(&mut Decoder::default(), header_only).unwrap_err();
        assert_eq!(err.close_code(), close_code::TOO_BIG);
    }

    #[test]
    fn fragments_count_toward_the_limit() {
        let mut bytes = client_frame(0x01, &[b'a'; 300]);
        bytes.extend(client_frame(0x80, &[b'b'; 300]));
        let err = decode(&mut Decoder::default(), &bytes).unwrap_err();
        assert!(matches!(err, FrameError::TooBig { size: 600, .. }));
    }

    #[test]
    fn unmasked_frame_is_a_protocol_error() {
        let err = decode(&mut Decoder::default(), &[0x81, 0x01, b'x']).unwrap_err();
        assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
    }

    #[test]
    fn control_frames_are_recognised() {
        let mut bytes = client_frame(0x89, b"p");
        bytes.extend(client_frame(0x8A, b""));
        bytes.extend(client_frame(0x88, &1000u16.to_be_bytes()));
        let frames = decode(&mut Decoder::default(), &bytes).unwrap();
        assert_eq!(
            frames,
            vec![
                Inbound::Ping(b"p".to_vec()),
                Inbound::Pong,
                Inbound::Close(Some(1000))
            ]
        );
    }

    #[test]
    fn stray_continuation_is_refused() {
        let err = decode(&mut Decoder::default(), &client_frame(0x80, b"x")).unwrap_err();
        assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
    }

    fn refusal(bytes: &[u8]) -> FrameError {
        decode(&mut Decoder::default(), bytes).unwrap_err()
    }

    fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        client_frame(0x88, &payload)
    }

    #[test]
    fn invalid_utf8_text_is_1007() {
        for bad in [
            &b"\xff"[..],
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"ok\xf4\x90\x80\x80",
        ] {
            let err = refusal(&client_frame(0x81, bad));
            assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD, "{bad:?}");
        }
        // Binary messages are not text: any bytes go.
        assert!(decode(&mut Decoder::default(), &client_frame(0x82, b"\xff\xfe")).is_ok());
    }

    #[test]
    fn invalid_utf8_split_across_fragments_is_1007() {
        let mut bytes = client_frame(0x01, b"ok \xf0\x9f");
        bytes.extend(client_frame(0x80, b"(not a continuation"));
        assert_eq!(refusal(&bytes).close_code(), close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn a_code_point_split_across_fragments_and_pings_is_fine() {
        let mut bytes = client_frame(0x01, b"\xce");
        bytes.extend(client_frame(0x89, b"mid-message ping"));
        bytes.extend(client_frame(0x00, b"\xba\xe1\xbd"));
        bytes.extend(client_frame(0x80, b"\xb9\xcf\x83\xce\xbc\xce\xb5"));
        let frames = decode(&mut Decoder::default(), &bytes).unwrap();
        assert_eq!(frames.len(), 4);
        assert!(matches!(
            frames[3],
            Inbound::Data {
                fin: true,
                text: true,
                ..
            }
        ));
    }

    #[test]
    fn a_text_message_ending_mid_character_is_1007() {
        let err = refusal(&client_frame(0x81, b"price: \xe2\x82"));
        assert_eq!(
            err,
            FrameError::InvalidUtf8("text message ends inside a UTF-8 character")
        );
        let mut bytes = client_frame(0x01, b"a");
        bytes.extend(client_frame(0x80, b"\xf0\x9f\x98"));
        assert_eq!(refusal(&bytes).close_code(), close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn the_first_invalid_fragment_fails_before_the_message_ends() {
        let mut decoder = Decoder::default();
        let err = decode(&mut decoder, &client_frame(0x01, b"\xff more to come")).unwrap_err();
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn utf8_state_does_not_leak_into_the_next_message() {
        let mut bytes = client_frame(0x81, "é".as_bytes());
        bytes.extend(client_frame(0x82, b"\x80"));
        bytes.extend(client_frame(0x81, b"fine"));
        assert_eq!(decode(&mut Decoder::default(), &bytes).unwrap().len(), 3);
    }

    #[test]
    fn close_reason_must_be_utf8() {
        let err = refusal(&close_frame(1000, b"bye \xff"));
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
        let frames = decode(
            &mut Decoder::default(),
            &close_frame(1000, "adiós".as_bytes()),
        );
        assert_eq!(frames.unwrap(), vec![Inbound::Close(Some(1000))]);
    }

    #[test]
    fn invalid_close_codes_are_1002() {
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let err = refusal(&close_frame(code, b""));
            assert_eq!(err, FrameError::BadCloseCode(code));
            assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
        }
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            let frames = decode(&mut Decoder::default(), &close_frame(code, b"")).unwrap();
            assert_eq!(frames, vec![Inbound::Close(Some(code))], "{code}");
        }
    }

    #[test]
    fn one_byte_close_payload_is_1002() {
        let err = refusal(&client_frame(0x88, &[0x03]));
        assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_set_is_1002_not_1009() {
        let mut bytes = vec![0x82, 0x80 | 127];
        bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        let err = refusal(&bytes);
        assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
        // Without the top bit, a huge length is still just too big.
        let mut bytes = vec![0x82, 0x80 | 127];
        bytes.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(refusal(&bytes).close_code(), close_code::TOO_BIG);
    }

    #[test]
    fn nothing_after_the_close_is_processed() {
        let mut bytes = close_frame(1000, b"");
        bytes.extend(client_frame(0x89, b"late ping"));
        bytes.extend([0x81, 0x01, b'x']); // unmasked: would be 1002
        let mut decoder = Decoder::default();
        let frames = decode(&mut decoder, &bytes).unwrap();
        assert_eq!(frames, vec![Inbound::Close(Some(1000))]);
        assert_eq!(decoder.buffered(), 0);
        // Later reads are ignored too.
        assert!(
            decode(&mut decoder, &client_frame(0x89, b"x"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn reserved_bits_are_1002() {
        for first in [0xC1, 0xA1, 0x91, 0xC9] {
            assert_eq!(
                refusal(&client_frame(first, b"x")).close_code(),
                close_code::PROTOCOL_ERROR,
                "{first:#x}"
            );
        }
    }

    #[test]
    fn reserved_opcodes_are_1002() {
        for opcode in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            // tungstenite's header parser already refuses some of them: 1002 either way.
            let err = refusal(&client_frame(0x80 | opcode, b""));
            assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR, "{opcode:#x}");
        }
    }

    #[test]
    fn big_or_fragmented_control_frames_are_1002() {
        let big_ping = client_frame(0x89, &[b'p'; 126]);
        assert_eq!(refusal(&big_ping).close_code(), close_code::PROTOCOL_ERROR);
        assert!(decode(&mut Decoder::default(), &client_frame(0x89, &[b'p'; 125])).is_ok());
        for unfinished in [0x09, 0x0A, 0x08] {
            let err = refusal(&client_frame(unfinished, b""));
            assert_eq!(
                err.close_code(),
                close_code::PROTOCOL_ERROR,
                "{unfinished:#x}"
            );
        }
    }

    #[test]
    fn a_new_message_inside_a_fragmented_one_is_1002() {
        for second in [0x81, 0x82, 0x01] {
            let mut bytes = client_frame(0x01, b"first");
            bytes.extend(client_frame(second, b"second"));
            assert_eq!(
                refusal(&bytes).close_code(),
                close_code::PROTOCOL_ERROR,
                "{second:#x}"
            );
        }
    }

    #[test]
    fn decoder_stays_forty_bytes() {
        // Part of every idle connection's task: the UTF-8 and close state must not grow it.
        assert!(std::mem::size_of::<Decoder>() <= 40);
    }

    #[test]
    fn encoded_text_frame_round_trips_through_tungstenite_header() {
        let frame = EncodedFrame::text(&[b'z'; 300]);
        let mut cursor = Cursor::new(frame.bytes());
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert_eq!(len, 300);
        assert!(header.is_final && header.mask.is_none());
        assert_eq!(frame.payload().len(), 300);
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        let frame = EncodedFrame::close(1009, "too big");
        assert_eq!(&frame.payload()[..2], &1009u16.to_be_bytes());
        assert_eq!(&frame.payload()[2..], b"too big");
    }
}
