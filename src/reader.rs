//! Reads client frames from the socket.
//!
//! fastwebsockets performs the upgrade; frames are read here because its
//! reader keeps a fixed 8 KiB buffer per connection, most of an idle
//! connection's memory (measured: 10.2 KiB per idle connection with it,
//! see BENCHMARKS.md). This buffer starts small, grows to the largest
//! frame seen, and shrinks back when it is empty.
//!
//! Each frame is checked as RFC 6455 §5 requires of a server: reserved bits
//! clear, a known opcode, masked, control frames final and at most 125
//! bytes; a frame over the message size limit is refused before its
//! payload is read.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::frame::{close_code, MAX_CONTROL_PAYLOAD};

/// The buffer's size when it is first needed and after it shrinks.
const INITIAL: usize = 512;
/// An empty buffer larger than this is given back.
const KEEP: usize = 4096;

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// One frame, its payload unmasked.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    pub(crate) fin: bool,
    pub(crate) opcode: OpCode,
    pub(crate) payload: &'a [u8],
}

/// Why no frame could be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// The socket ended or failed.
    Gone,
    /// The client broke the protocol: close with this code.
    Violation { code: u16, reason: &'static str },
}

fn violation(code: u16, reason: &'static str) -> ReadError {
    ReadError::Violation { code, reason }
}

pub(crate) struct FrameReader<R> {
    io: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_payload: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames from `io`, refusing payloads over `max_payload` bytes.
    pub(crate) fn new(io: R, max_payload: usize) -> Self {
        Self {
            io,
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_payload,
        }
    }

    /// The next frame. Not cancel-safe only in that a frame half read
    /// stays buffered: calling again continues where it stopped.
    pub(crate) async fn next(&mut self) -> Result<Frame<'_>, ReadError> {
        loop {
            match self.parse()? {
                Some((header, len)) => {
                    let start = self.start + header;
                    self.start += header + len;
                    let (fin, opcode) = (
                        self.buf[start - header] & 0x80 != 0,
                        opcode(self.buf[start - header])?,
                    );
                    let mask: [u8; 4] = self.buf[start - 4..start].try_into().expect("4 bytes");
                    let payload = &mut self.buf[start..start + len];
                    unmask(payload, mask);
                    return Ok(Frame {
                        fin,
                        opcode,
                        payload,
                    });
                }
                None => self.fill().await?,
            }
        }
    }

    /// Reads and discards frames until the client's Close frame, or the
    /// end of the stream. Input that no longer parses is discarded
    /// wholesale until the end.
    pub(crate) async fn drain(&mut self) {
        loop {
            match self.next().await {
                Ok(frame) if frame.opcode == OpCode::Close => return,
                Ok(_) => {}
                Err(ReadError::Gone) => return,
                Err(ReadError::Violation { .. }) => break,
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
    fn parse(&self) -> Result<Option<(usize, usize)>, ReadError> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return Ok(None);
        }
        if b[0] & 0x70 != 0 {
            return Err(violation(close_code::PROTOCOL_ERROR, "reserved bits set"));
        }
        let opcode = opcode(b[0])?;
        if b[1] & 0x80 == 0 {
            return Err(violation(
                close_code::PROTOCOL_ERROR,
                "client frames must be masked",
            ));
        }
        let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
        if control && b[0] & 0x80 == 0 {
            return Err(violation(
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
            return Err(violation(
                close_code::PROTOCOL_ERROR,
                "control frame too long",
            ));
        }
        if len > self.max_payload as u64 {
            return Err(violation(close_code::MESSAGE_TOO_BIG, "message too big"));
        }
        let header = 2 + length_bytes + 4;
        let len = len as usize;
        Ok((b.len() >= header + len).then_some((header, len)))
    }

    /// Reads more bytes, making room first.
    async fn fill(&mut self) -> Result<(), ReadError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP {
                self.buf = Vec::new();
            }
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // The frame being read may need more: grow to hold its header
            // and payload, at least doubling.
            let wanted = self.frame_len_hint().max(self.buf.len() * 2).max(INITIAL);
            self.buf.resize(wanted, 0);
        }
        match self.io.read(&mut self.buf[self.end..]).await {
            Ok(0) | Err(_) => Err(ReadError::Gone),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
        }
    }

    /// The size of the buffered frame, when its header says.
    fn frame_len_hint(&self) -> usize {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return 0;
        }
        match b[1] & 0x7F {
            126 if b.len() >= 4 => 8 + u16::from_be_bytes([b[2], b[3]]) as usize,
            127 if b.len() >= 10 => {
                let len = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
                14 + len.min(self.max_payload as u64) as usize
            }
            n => 6 + n as usize,
        }
    }
}

fn opcode(byte: u8) -> Result<OpCode, ReadError> {
    Ok(match byte & 0x0F {
        0x0 => OpCode::Continuation,
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        _ => return Err(violation(close_code::PROTOCOL_ERROR, "unknown opcode")),
    })
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
    ) -> Vec<Result<(bool, OpCode, Vec<u8>), ReadError>> {
        let mut reader = FrameReader::new(&bytes[..], max);
        let mut out = Vec::new();
        loop {
            match reader.next().await {
                Ok(f) => out.push(Ok((f.fin, f.opcode, f.payload.to_vec()))),
                Err(ReadError::Gone) => return out,
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
            (masked(0x81, &[b'a'; 101]), 1009),                     // over the limit
        ];
        for (bytes, code) in cases {
            let frames = read_all(bytes, 100).await;
            assert!(
                matches!(frames.last(), Some(Err(ReadError::Violation { code: c, .. })) if *c == code),
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
        let mut reader = FrameReader::new(server, 1 << 20);
        let frame = reader.next().await.unwrap();
        assert_eq!(frame.payload, &[b'q'; 10_000][..]);
        drop(writer.await.unwrap());
        assert_eq!(reader.next().await.unwrap_err(), ReadError::Gone);
        assert!(reader.buf.capacity() <= KEEP, "the buffer shrank back");
    }
}
