//! The wire: server-to-client frames, built once and shared (here), and
//! client messages read from the socket ([`Decoder`]).
//!
//! A server never masks its frames (RFC 6455 §5.1), so a frame is just a
//! header followed by the payload. Building the complete frame once per
//! publish lets every subscriber's writer send the very same bytes: a
//! [`Bytes`] clone is a reference count, not a copy.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

/// Close codes the layer sends, as named constants (RFC 6455 §7.4.1).
pub mod close_code {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: u16 = 1000;
    /// 1001: the server is going away (graceful shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: the peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1007: a text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// 1008: the peer broke a policy of this server.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// 1009: a message was larger than the configured maximum.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// 1013: try again later; the client fell too far behind (its
    /// outbound queue overflowed).
    pub const TRY_AGAIN_LATER: u16 = 1013;

    /// Whether `code` may appear in a Close frame on the wire, per the
    /// IANA registry: 1012–1014 are registered (restart, try again later,
    /// bad gateway); 1004–1006 and 1015 are reserved for local use, 1016–2999
    /// are unassigned, and anything below 1000 or above 4999 is invalid.
    pub(crate) fn may_be_sent(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

mod decode;
pub(crate) mod deflate;

pub(crate) use self::decode::{DecodeError, Decoded, Decoder};

/// A frame's opcode (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    /// The opcode in a frame's first byte; `None` for a reserved one.
    fn of(first_byte: u8) -> Option<Self> {
        Some(match first_byte & 0x0F {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

const FIN: u8 = 0x80;
/// The longest header of an unmasked frame: 2 bytes + 8 bytes of length.
const MAX_HEADER: usize = 10;
/// Control frames carry at most 125 payload bytes (RFC 6455 §5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// The frame that starts at `start` in `buf`. Advancing rather than
/// slicing keeps the bytes' handle unshared: `Bytes::slice` clones, which
/// allocates a shared header for every message, and nothing else needs
/// one (a message is shared behind its own `Arc`).
pub(crate) fn framed(buf: Vec<u8>, start: usize) -> Bytes {
    let mut frame = Bytes::from(buf);
    bytes::Buf::advance(&mut frame, start);
    frame
}

/// Serializes `message` as JSON and wraps it in a text frame, without
/// copying the payload: the JSON is written after room for the longest
/// header, and the header is then written right before it.
pub(crate) fn json_text<T: Serialize + ?Sized>(message: &T) -> Result<Bytes, serde_json::Error> {
    let mut buf = Vec::with_capacity(128);
    buf.resize(MAX_HEADER, 0);
    serde_json::to_writer(&mut buf, message)?;
    let start = write_header_before(&mut buf, MAX_HEADER);
    Ok(framed(buf, start))
}

/// Writes the header of a final text frame whose payload is
/// `buf[payload_start..]` into the bytes right before it; returns where
/// the frame starts. `payload_start` must leave room for the header.
pub(crate) fn write_header_before(buf: &mut [u8], payload_start: usize) -> usize {
    header_before(buf, payload_start, FIN | OpCode::Text as u8)
}

/// As [`write_header_before`], for a frame whose first byte is `first`.
fn header_before(buf: &mut [u8], payload_start: usize, first: u8) -> usize {
    let mut header = [0u8; MAX_HEADER];
    let header_len = write_header(&mut header, first, buf.len() - payload_start);
    let start = payload_start - header_len;
    buf[start..payload_start].copy_from_slice(&header[..header_len]);
    start
}

/// A text frame carrying `payload` (UTF-8, checked by the caller's type).
pub(crate) fn text(payload: &[u8]) -> Bytes {
    data(OpCode::Text, payload)
}

/// A binary frame carrying `payload`.
pub(crate) fn binary(payload: &[u8]) -> Bytes {
    data(OpCode::Binary, payload)
}

fn data(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut header = [0u8; MAX_HEADER];
    let header_len = write_header(&mut header, FIN | opcode as u8, payload.len());
    let mut buf = BytesMut::with_capacity(header_len + payload.len());
    buf.put_slice(&header[..header_len]);
    buf.put_slice(payload);
    buf.freeze()
}

/// A Ping frame with an empty payload.
pub(crate) fn ping() -> Bytes {
    Bytes::from_static(&[FIN | OpCode::Ping as u8, 0])
}

/// A Pong frame echoing `payload` (at most 125 bytes, checked by the reader).
pub(crate) fn pong(payload: &[u8]) -> Bytes {
    control(OpCode::Pong, payload)
}

/// A Close frame with `code` and a UTF-8 `reason`, cut to fit 125 bytes on a
/// character boundary.
pub(crate) fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control(OpCode::Close, &payload)
}

/// The code and reason of a Close frame built by [`close`]; no code for
/// one without.
pub(crate) fn close_parts(frame: &[u8]) -> (Option<u16>, &[u8]) {
    match frame {
        [_, _, a, b, reason @ ..] => (Some(u16::from_be_bytes([*a, *b])), reason),
        _ => (None, &[]),
    }
}

/// A Close frame without a code, the answer to one without a code.
pub(crate) fn close_empty() -> Bytes {
    Bytes::from_static(&[FIN | OpCode::Close as u8, 0])
}

fn control(opcode: OpCode, payload: &[u8]) -> Bytes {
    debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    let mut buf = BytesMut::with_capacity(2 + payload.len());
    buf.put_u8(FIN | opcode as u8);
    buf.put_u8(payload.len() as u8);
    buf.put_slice(payload);
    buf.freeze()
}

/// Writes the header of an unmasked frame whose first byte is `first`;
/// returns its length.
fn write_header(out: &mut [u8; MAX_HEADER], first: u8, payload_len: usize) -> usize {
    out[0] = first;
    if payload_len < 126 {
        out[1] = payload_len as u8;
        2
    } else if let Ok(len) = u16::try_from(payload_len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// The payload of an unmasked frame this module wrote.
pub(crate) fn payload(frame: &[u8]) -> &[u8] {
    match frame.get(1) {
        Some(126) => &frame[4..],
        Some(127) => &frame[10..],
        Some(_) => &frame[2..],
        None => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_frames_use_the_shortest_length_encoding() {
        for (len, header_len) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
        ] {
            // A JSON string of `len` bytes including its two quotes.
            let text = "x".repeat(len.saturating_sub(2));
            let frame = json_text(&text).unwrap();
            let json_len = text.len() + 2;
            assert_eq!(frame.len(), header_len + json_len, "len {len}");
            assert_eq!(frame[0], 0x81);
            assert_eq!(payload(&frame), serde_json::to_vec(&text).unwrap());
        }
    }

    #[test]
    fn a_close_is_answered_with_its_code() {
        assert_eq!(&close(1000, "")[..], &[0x88, 2, 0x03, 0xE8]);
        assert_eq!(&close_empty()[..], &[0x88, 0]);
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let frame = close(close_code::GOING_AWAY, &"é".repeat(100));
        assert_eq!(frame[0], 0x88);
        let len = frame[1] as usize;
        assert!(len <= MAX_CONTROL_PAYLOAD);
        assert_eq!(&frame[2..4], &1001u16.to_be_bytes());
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }

    #[test]
    fn close_codes_that_may_be_sent() {
        for ok in [1000, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999] {
            assert!(close_code::may_be_sent(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!close_code::may_be_sent(bad), "{bad}");
        }
    }
}
