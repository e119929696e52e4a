//! Server-Sent Events (the WHATWG `text/event-stream` format): a pushed message as one
//! event, and the stream's other lines (comments that keep proxies from timing out, the
//! reconnection delay, the closing event).
//!
//! Pure encoding; no I/O. A line break inside a message (LF, CR or CRLF, all of which end
//! a line in an event stream) starts a new `data:` line, which EventSource joins back with
//! LF.

/// One event carrying `payload`: `data: <line>\n` per line, then a blank line.
pub(crate) fn event(payload: &[u8]) -> Box<[u8]> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    for line in lines(payload) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out.into_boxed_slice()
}

/// One event of a recovering client: `id: <epoch>:<seq>` first, so that EventSource
/// sends it back as `Last-Event-ID` when it reconnects, then the payload as [`event`].
pub(crate) fn event_with_id(epoch: &str, seq: u64, payload: &[u8]) -> Box<[u8]> {
    let mut out = format!("id: {epoch}:{seq}\n").into_bytes();
    out.extend_from_slice(&event(payload));
    out.into_boxed_slice()
}

/// The event that ends a stream: named `close`, the reason's code as its data.
pub(crate) fn close_event(code: u16) -> Box<[u8]> {
    format!("event: close\ndata: {code}\n\n")
        .into_bytes()
        .into_boxed_slice()
}

/// A comment line: ignored by EventSource, but traffic for proxies and for the heartbeat.
pub(crate) const KEEPALIVE: &[u8] = b": ping\n\n";

/// The `retry:` field telling EventSource how many milliseconds to wait before it
/// reconnects.
pub(crate) fn retry_field(millis: u128) -> String {
    format!("retry: {millis}\n\n")
}

/// The lines of `payload` split at LF, CR or CRLF (a trailing break ends a last, empty
/// line, so that the message comes back byte for byte with LF).
fn lines(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(payload);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.iter().position(|&b| b == b'\n' || b == b'\r') {
            None => {
                rest = None;
                Some(current)
            }
            Some(at) => {
                let skip = if current[at..].starts_with(b"\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&current[at + skip..]);
                Some(&current[..at])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_numbered_event_leads_with_its_id() {
        assert_eq!(
            &*event_with_id("ep", 3, b"a\nb"),
            b"id: ep:3\ndata: a\ndata: b\n\n"
        );
    }

    #[test]
    fn each_line_is_a_data_line() {
        assert_eq!(&*event(b"hi"), b"data: hi\n\n");
        assert_eq!(&*event(b"a\nb"), b"data: a\ndata: b\n\n");
        assert_eq!(&*event(b"a\r\nb\rc"), b"data: a\ndata: b\ndata: c\n\n");
        assert_eq!(&*event(b"a\n"), b"data: a\ndata: \n\n");
        assert_eq!(&*event(b""), b"data: \n\n");
        assert_eq!(&*event(b"\r\n\n"), b"data: \ndata: \ndata: \n\n");
    }

    #[test]
    fn the_stream_lines() {
        assert_eq!(&*close_event(1001), b"event: close\ndata: 1001\n\n");
        assert_eq!(retry_field(2000), "retry: 2000\n\n");
    }
}
