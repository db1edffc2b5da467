//! Reads client messages from the socket.
//!
//! Frames are read here rather than by fastwebsockets, whose reader keeps a
//! fixed 8 KiB buffer per connection: this one starts small, grows to the
//! largest frame seen, and shrinks back when it is empty (BENCHMARKS.md).
//!
//! Each frame is checked as RFC 6455 §5 requires of a server: reserved bits
//! clear, a known opcode, masked, control frames final and at most 125
//! bytes; a frame over the message size limit is refused before its
//! payload is read. The [`Decoder`] on top puts fragments together (the
//! size limit applies to the whole message), checks that text is UTF-8,
//! failing at the fragment that breaks it, and checks Close frames
//! (§5.5.1, §7.4), so what it yields are whole, valid messages.
//!
//! On a connection that negotiated permessage-deflate, RSV1 on a message's
//! first frame marks it compressed (RFC 7692 §6): its frames are put
//! together as they came, and the whole is inflated under the size limit
//! before its text is checked.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::deflate::{self, InflateError, RSV1};
use super::{close_code, OpCode, MAX_CONTROL_PAYLOAD};

/// The most read at once into a connection that has nothing buffered.
const INITIAL: usize = 512;

/// What the decoder read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A whole text message.
    Text(&'a str),
    /// A whole binary message.
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// A valid Close frame, with its code if it has one.
    Close(Option<u16>),
    /// A fragment of a message still being put together: the client is
    /// alive, and nothing is to be done yet.
    Fragment,
}

/// Why no message could be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The socket ended or failed.
    Gone,
    /// A message broke the protocol (invalid UTF-8, too big, a fragment out
    /// of place) but the stream still parses: close with this code, and
    /// read on until the client's Close.
    Violation { code: u16, reason: &'static str },
    /// A frame that does not parse, or a bad Close: close with this code
    /// and hang up.
    Broken { code: u16, reason: &'static str },
}

fn broken(code: u16, reason: &'static str) -> DecodeError {
    DecodeError::Broken { code, reason }
}

fn violation(code: u16, reason: &'static str) -> DecodeError {
    DecodeError::Violation { code, reason }
}

/// A whole frame buffered by [`Decoder::poll_frame`]: its header and
/// payload lengths.
pub(crate) struct Found((usize, usize));

/// Reads whole client messages from a socket.
pub(crate) struct Decoder<R> {
    frames: Frames<R>,
    /// The fragmented message being put together, or the last one put
    /// together (or inflated), lent out until the next read. Boxed, as most
    /// connections never fragment or compress, and this sits in every
    /// connection's task.
    assembling: Option<Box<Assembly>>,
}

/// The most a compressed message of at most `max_message` bytes may take
/// before it is inflated: deflate's stored blocks add 5 bytes per 64 KiB,
/// so a message that does not compress takes a little more than its size.
fn compressed_limit(max_message: usize) -> usize {
    max_message.saturating_add(max_message / 1024 + 64)
}

/// A fragmented message being put together.
struct Assembly {
    is_text: bool,
    /// Compressed: inflated, and its text checked, once whole.
    compressed: bool,
    /// The most its frames may carry, put together.
    limit: usize,
    buf: Vec<u8>,
    /// How much of `buf` is known to be valid UTF-8.
    utf8_checked: usize,
    /// Whole: `buf` is the message, lent out.
    whole: bool,
}

impl<R: AsyncRead + Unpin> Decoder<R> {
    /// Reads messages from `io`; with `inflate`, compressed ones too. The
    /// size limit is given to each read: it is the layer's, and this is
    /// part of every connection's task.
    pub(crate) fn new(io: R, inflate: bool) -> Self {
        Self {
            frames: Frames::new(io, inflate),
            assembling: None,
        }
    }

    /// The next message, or a fragment of one, as [`Decoder::poll_frame`]
    /// and [`Decoder::decode`] read it.
    #[cfg(test)]
    pub(crate) async fn next(&mut self, max_message: usize) -> Result<Decoded<'_>, DecodeError> {
        let found = std::future::poll_fn(|cx| self.poll_frame(cx, max_message)).await?;
        self.decode(found, max_message)
    }

    /// Reads until a whole frame is buffered, for [`Decoder::decode`]; no
    /// message of over `max_message` bytes is taken. A frame half read
    /// stays buffered: polling again continues where it stopped. A poll,
    /// not an `async fn`: its state would sit in every connection's task.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        max_message: usize,
    ) -> Poll<Result<Found, DecodeError>> {
        if self.assembling.as_ref().is_some_and(|a| a.whole) {
            self.assembling = None;
        }
        self.frames.poll_frame(cx, max_message).map_ok(Found)
    }

    /// The message, or fragment of one, that the frame `found` makes.
    pub(crate) fn decode(
        &mut self,
        found: Found,
        max_message: usize,
    ) -> Result<Decoded<'_>, DecodeError> {
        let frame = self.frames.take(found.0);
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if self.assembling.is_some() {
                    return Err(violation(
                        close_code::PROTOCOL_ERROR,
                        "expected a continuation frame",
                    ));
                }
                let is_text = frame.opcode == OpCode::Text;
                if frame.fin && frame.compressed {
                    let mut inflated = Vec::new();
                    inflate(frame.payload, max_message, &mut inflated)?;
                    let assembly = self.assembling.insert(Box::new(Assembly {
                        is_text,
                        compressed: true,
                        limit: 0,
                        buf: inflated,
                        utf8_checked: 0,
                        whole: true,
                    }));
                    return whole(is_text, &assembly.buf);
                }
                if frame.fin {
                    // Frames may carry a compressed message's allowance.
                    if frame.payload.len() > max_message {
                        return Err(violation(close_code::MESSAGE_TOO_BIG, "message too big"));
                    }
                    return whole(is_text, frame.payload);
                }
                let mut started = Assembly {
                    is_text,
                    compressed: frame.compressed,
                    limit: if frame.compressed {
                        compressed_limit(max_message)
                    } else {
                        max_message
                    },
                    buf: Vec::new(),
                    utf8_checked: 0,
                    whole: false,
                };
                started.push(frame.payload)?;
                self.assembling = Some(Box::new(started));
                Ok(Decoded::Fragment)
            }
            OpCode::Continuation => {
                let Some(assembly) = self.assembling.as_mut() else {
                    return Err(violation(
                        close_code::PROTOCOL_ERROR,
                        "unexpected continuation frame",
                    ));
                };
                assembly.push(frame.payload)?;
                if !frame.fin {
                    return Ok(Decoded::Fragment);
                }
                if assembly.compressed {
                    let mut inflated = Vec::new();
                    inflate(&assembly.buf, max_message, &mut inflated)?;
                    assembly.buf = inflated;
                }
                assembly.whole = true;
                whole(assembly.is_text, &assembly.buf)
            }
            OpCode::Close => close(frame.payload).map(Decoded::Close),
            OpCode::Ping => Ok(Decoded::Ping(frame.payload)),
            OpCode::Pong => Ok(Decoded::Pong),
        }
    }

    /// Reads and discards frames until the client's Close frame, or the
    /// end of the stream. Input that no longer parses is discarded
    /// wholesale until the end.
    pub(crate) async fn drain(&mut self, max_message: usize) {
        self.assembling = None;
        self.frames.drain(max_message).await;
    }
}

/// Inflates a compressed message into `out`.
fn inflate(compressed: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    deflate::inflate(compressed, max, out).map_err(|e| match e {
        InflateError::TooBig => violation(close_code::MESSAGE_TOO_BIG, "message too big"),
        InflateError::Corrupt => violation(
            close_code::INVALID_PAYLOAD,
            "compressed message does not inflate",
        ),
    })
}

/// A whole message, once its text is known to be UTF-8.
fn whole(is_text: bool, payload: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    if !is_text {
        return Ok(Decoded::Binary(payload));
    }
    match std::str::from_utf8(payload) {
        Ok(text) => Ok(Decoded::Text(text)),
        Err(_) => Err(violation(
            close_code::INVALID_PAYLOAD,
            "text is not valid UTF-8",
        )),
    }
}

impl Assembly {
    /// Adds a fragment. The limit is on the whole message (frames are only
    /// limited each), and text must stay valid UTF-8 but for a character
    /// the next fragment finishes, so invalid text fails at the fragment
    /// that brings it.
    fn push(&mut self, fragment: &[u8]) -> Result<(), DecodeError> {
        if self.buf.len() + fragment.len() > self.limit {
            return Err(violation(close_code::MESSAGE_TOO_BIG, "message too big"));
        }
        self.buf.extend_from_slice(fragment);
        if self.is_text && !self.compressed {
            match std::str::from_utf8(&self.buf[self.utf8_checked..]) {
                Ok(_) => self.utf8_checked = self.buf.len(),
                Err(e) if e.error_len().is_none() => self.utf8_checked += e.valid_up_to(),
                Err(_) => {
                    return Err(violation(
                        close_code::INVALID_PAYLOAD,
                        "text is not valid UTF-8",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// A Close frame's code, if it is valid (RFC 6455 §5.5.1, §7.4).
fn close(payload: &[u8]) -> Result<Option<u16>, DecodeError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(broken(
            close_code::PROTOCOL_ERROR,
            "close frame with a 1-byte payload",
        )),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code::may_be_sent(code) {
                Err(broken(close_code::PROTOCOL_ERROR, "invalid close code"))
            } else if std::str::from_utf8(&payload[2..]).is_err() {
                Err(broken(
                    close_code::INVALID_PAYLOAD,
                    "close reason is not valid UTF-8",
                ))
            } else {
                Ok(Some(code))
            }
        }
    }
}

/// One frame, its payload unmasked.
#[derive(Debug)]
struct Frame<'a> {
    fin: bool,
    opcode: OpCode,
    /// RSV1: the first frame of a compressed message.
    compressed: bool,
    payload: &'a [u8],
}

/// Reads frames, checking each.
struct Frames<R> {
    io: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Whether RSV1 may be set (permessage-deflate was negotiated).
    rsv1: bool,
}

impl<R: AsyncRead + Unpin> Frames<R> {
    /// Reads frames from `io`; with `rsv1`, RSV1 is allowed on the first
    /// frame of a message. Each read refuses payloads that cannot be part
    /// of a message of at most `max_message` bytes.
    fn new(io: R, rsv1: bool) -> Self {
        Self {
            io,
            buf: Vec::new(),
            start: 0,
            end: 0,
            rsv1,
        }
    }

    /// Reads until a whole frame is buffered: its header and payload
    /// lengths, for [`Frames::take`]. A frame half read stays buffered:
    /// polling again continues where it stopped.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        max_message: usize,
    ) -> Poll<Result<(usize, usize), DecodeError>> {
        let max_payload = self.max_payload(max_message);
        loop {
            if let Some(found) = self.parse(max_payload)? {
                return Poll::Ready(Ok(found));
            }
            ready!(self.poll_fill(cx, max_payload))?;
        }
    }

    /// The next frame, as [`Frames::poll_frame`] and [`Frames::take`].
    async fn next(&mut self, max_message: usize) -> Result<Frame<'_>, DecodeError> {
        let found = std::future::poll_fn(|cx| self.poll_frame(cx, max_message)).await?;
        Ok(self.take(found))
    }

    /// The frame [`Frames::poll_frame`] found, unmasked, and consumed.
    fn take(&mut self, (header, len): (usize, usize)) -> Frame<'_> {
        let start = self.start + header;
        self.start += header + len;
        let first = self.buf[start - header];
        let opcode = OpCode::of(first).expect("checked by parse");
        let mask: [u8; 4] = self.buf[start - 4..start].try_into().expect("4 bytes");
        let payload = &mut self.buf[start..start + len];
        unmask(payload, mask);
        Frame {
            fin: first & 0x80 != 0,
            opcode,
            compressed: first & RSV1 != 0,
            payload,
        }
    }

    /// As [`Decoder::drain`].
    async fn drain(&mut self, max_message: usize) {
        loop {
            match self.next(max_message).await {
                Ok(frame) if frame.opcode == OpCode::Close => return,
                Ok(_) => {}
                Err(DecodeError::Gone) => return,
                Err(_) => break,
            }
        }
        self.start = 0;
        self.end = 0;
        if self.buf.len() < INITIAL {
            self.buf.resize(INITIAL, 0);
        }
        while let Ok(n) = self.io.read(&mut self.buf).await {
            if n == 0 {
                return;
            }
        }
    }

    /// Checks the header of the buffered frame; returns its header and
    /// payload lengths once the whole frame is buffered.
    fn parse(&self, max_payload: usize) -> Result<Option<(usize, usize)>, DecodeError> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return Ok(None);
        }
        let Some(opcode) = OpCode::of(b[0]) else {
            return Err(broken(close_code::PROTOCOL_ERROR, "unknown opcode"));
        };
        let rsv1_allowed = self.rsv1 && matches!(opcode, OpCode::Text | OpCode::Binary);
        if b[0] & 0x70 != 0 && !(b[0] & 0x70 == RSV1 && rsv1_allowed) {
            return Err(broken(close_code::PROTOCOL_ERROR, "reserved bits set"));
        }
        if b[1] & 0x80 == 0 {
            return Err(broken(
                close_code::PROTOCOL_ERROR,
                "client frames must be masked",
            ));
        }
        let control = opcode.is_control();
        if control && b[0] & 0x80 == 0 {
            return Err(broken(
                close_code::PROTOCOL_ERROR,
                "fragmented control frame",
            ));
        }
        let (len, length_bytes) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 2),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")), 8),
            126 | 127 => return Ok(None),
            n => (u64::from(n), 0),
        };
        if control && len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(broken(close_code::PROTOCOL_ERROR, "control frame too long"));
        }
        if len > max_payload as u64 {
            return Err(broken(close_code::MESSAGE_TOO_BIG, "message too big"));
        }
        let header = 2 + length_bytes + 4;
        let len = len as usize;
        Ok((b.len() >= header + len).then_some((header, len)))
    }

    /// Reads more bytes, making room first.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        max_payload: usize,
    ) -> Poll<Result<(), DecodeError>> {
        if self.start == self.end {
            // Nothing buffered: the buffer is given back, and the next bytes
            // are read on the stack before one is made for them, so a
            // connection that waits for its client holds none.
            self.start = 0;
            self.end = 0;
            self.buf = Vec::new();
            let mut bytes = [0; INITIAL];
            let mut read = ReadBuf::new(&mut bytes);
            return match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
                Ok(()) if !read.filled().is_empty() => {
                    self.buf.extend_from_slice(read.filled());
                    self.end = self.buf.len();
                    Poll::Ready(Ok(()))
                }
                _ => Poll::Ready(Err(DecodeError::Gone)),
            };
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // The frame being read may need more: grow to hold its header
            // and payload, at least doubling.
            let wanted = self
                .frame_len_hint(max_payload)
                .max(self.buf.len() * 2)
                .max(INITIAL);
            self.buf.resize(wanted, 0);
        }
        let mut read = ReadBuf::new(&mut self.buf[self.end..]);
        match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
            Ok(()) if !read.filled().is_empty() => {
                self.end += read.filled().len();
                Poll::Ready(Ok(()))
            }
            _ => Poll::Ready(Err(DecodeError::Gone)),
        }
    }

    /// The most one frame may carry: a compressed message may take a
    /// little more than its size.
    fn max_payload(&self, max_message: usize) -> usize {
        if self.rsv1 {
            compressed_limit(max_message)
        } else {
            max_message
        }
    }

    /// The size of the buffered frame, when its header says.
    fn frame_len_hint(&self, max_payload: usize) -> usize {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return 0;
        }
        match b[1] & 0x7F {
            126 if b.len() >= 4 => 8 + u16::from_be_bytes([b[2], b[3]]) as usize,
            127 if b.len() >= 10 => {
                let len = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
                14 + len.min(max_payload as u64) as usize
            }
            n => 6 + n as usize,
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let mut chunks = payload.chunks_exact_mut(4);
    let word = u32::from_ne_bytes(mask);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes(chunk.try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9u8, 8, 7, 6];
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    async fn read_all(
        bytes: Vec<u8>,
        max: usize,
    ) -> Vec<Result<(bool, OpCode, Vec<u8>), DecodeError>> {
        let mut reader = Frames::new(&bytes[..], false);
        let mut out = Vec::new();
        loop {
            match reader.next(max).await {
                Ok(f) => out.push(Ok((f.fin, f.opcode, f.payload.to_vec()))),
                Err(DecodeError::Gone) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_of_every_length_encoding_unmask() {
        let big = vec![b'z'; 70_000];
        let mut bytes = masked(0x81, b"hello");
        bytes.extend(masked(0x01, &[b'a'; 300]));
        bytes.extend(masked(0x80, &big));
        bytes.extend(masked(0x89, b"p"));
        let frames = read_all(bytes, 1 << 20).await;
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0], Ok((true, OpCode::Text, b"hello".to_vec())));
        assert_eq!(frames[1], Ok((false, OpCode::Text, vec![b'a'; 300])));
        assert_eq!(frames[2], Ok((true, OpCode::Continuation, big)));
        assert_eq!(frames[3], Ok((true, OpCode::Ping, b"p".to_vec())));
    }

    #[tokio::test]
    async fn protocol_violations_are_named() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], 1002), // unmasked
            (masked(0xC1, b"x"), 1002),                             // RSV1
            (masked(0x83, b"x"), 1002),                             // opcode 3
            (masked(0x09, b"x"), 1002),                             // fragmented ping
            (masked(0x89, &[0; 126]), 1002),                        // long ping
            (masked(0x88, &[0x03, 0xE8].repeat(63)), 1002),         // long close
            (masked(0x81, &[b'a'; 101]), 1009),                     // over the limit
        ];
        for (bytes, code) in cases {
            let frames = read_all(bytes, 100).await;
            assert!(
                matches!(frames.last(), Some(Err(DecodeError::Broken { code: c, .. })) if *c == code),
                "{frames:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_frame_split_across_reads_is_put_together() {
        let bytes = masked(0x81, &[b'q'; 10_000]);
        let (mut client, server) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut client, &bytes)
                .await
                .unwrap();
            client
        });
        let mut reader = Frames::new(server, false);
        let frame = reader.next(1 << 20).await.unwrap();
        assert_eq!(frame.payload, &[b'q'; 10_000][..]);
        drop(writer.await.unwrap());
        assert_eq!(reader.next(1 << 20).await.unwrap_err(), DecodeError::Gone);
        assert_eq!(reader.buf.capacity(), 0, "the buffer was given back");
    }

    #[test]
    fn close_frames_are_checked_per_rfc() {
        assert_eq!(close(&[]), Ok(None));
        assert!(matches!(
            close(&[3]),
            Err(DecodeError::Broken { code: 1002, .. })
        ));
        // 1004 is reserved.
        assert!(matches!(
            close(&[0x03, 0xEC]),
            Err(DecodeError::Broken { code: 1002, .. })
        ));
        assert!(matches!(
            close(&[0x03, 0xE8, 0xFF]),
            Err(DecodeError::Broken { code: 1007, .. })
        ));
        assert_eq!(close(b"\x03\xe8bye"), Ok(Some(1000)));
    }

    #[test]
    fn fragmented_text_fails_at_the_fragment_that_breaks_utf8() {
        let mut a = Assembly {
            is_text: true,
            compressed: false,
            limit: 100,
            buf: Vec::new(),
            utf8_checked: 0,
            whole: false,
        };
        // "é" split across two fragments is fine.
        assert!(a.push(&[b'a', 0xC3]).is_ok());
        assert!(a.push(&[0xA9, b'b']).is_ok());
        assert!(matches!(
            a.push(&[0xFF]),
            Err(DecodeError::Violation { code: 1007, .. })
        ));
        assert!(matches!(
            a.push(&[b'x'; 200]),
            Err(DecodeError::Violation { code: 1009, .. })
        ));
    }

    #[tokio::test]
    async fn with_inflation_on_a_plain_message_keeps_the_plain_limit() {
        let bytes = masked(0x81, &[b'a'; 101]);
        let mut decoder = Decoder::new(&bytes[..], true);
        assert!(matches!(
            decoder.next(100).await,
            Err(DecodeError::Violation { code: 1009, .. })
        ));
    }

    #[tokio::test]
    async fn the_decoder_yields_whole_messages() {
        let mut bytes = masked(0x01, "h\u{e9}".as_bytes()[..2].as_ref());
        bytes.extend(masked(0x89, b"p"));
        bytes.extend(masked(0x80, "\u{e9}llo".as_bytes()[1..].as_ref()));
        bytes.extend(masked(0x82, &[1, 2]));
        bytes.extend(masked(0x88, &[0x03, 0xE8]));
        bytes.extend(masked(0x80, b"x"));
        let mut decoder = Decoder::new(&bytes[..], false);
        assert_eq!(decoder.next(100).await, Ok(Decoded::Fragment));
        assert_eq!(decoder.next(100).await, Ok(Decoded::Ping(b"p")));
        assert_eq!(decoder.next(100).await, Ok(Decoded::Text("h\u{e9}llo")));
        assert_eq!(decoder.next(100).await, Ok(Decoded::Binary(&[1, 2])));
        assert_eq!(decoder.next(100).await, Ok(Decoded::Close(Some(1000))));
        assert!(matches!(
            decoder.next(100).await,
            Err(DecodeError::Violation { code: 1002, .. })
        ));
    }
}
