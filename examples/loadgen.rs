//! Load generator for the bench protocol (`../shared/bench/README.md`).
//! Drives any server that speaks it: tower-ws's `bench_server` and the
//! original Node.js system alike. Prints one JSON line of results.
//!
//! ```text
//! loadgen s1 ADDR [--clients 1000] [--count 2000] [--size 128]
//! loadgen s2 ADDR [--topics 1000] [--count 200] [--size 64]
//! loadgen s3 ADDR --pid PID [--clients 10000]
//! loadgen s4 ADDR [--clients 5000] [--inflight 64]
//! loadgen s5 ADDR [--topics 1000] [--per-topic 1] [--rate 20000] [--duration 5] [--size 64] --pid PID
//! ```
//!
//! `--transport sse` subscribes with Server-Sent Events instead (`GET
//! /ws?requestId=…`, `Accept: text/event-stream`), for servers that offer
//! them, such as tower-ws's. `--deflate` offers permessage-deflate as
//! browsers do, and inflates what comes compressed.
//!
//! The client is minimal on purpose (raw frames over TCP, one read for
//! many frames), so that on one core it keeps up with the server it
//! measures. Where it does not, `loadgen_cpu_s` (S1, S2, S4: its own CPU
//! over the run) is close to the run's elapsed time: then the generator,
//! not the server, set the rate. With `--pid`, `server_cpu_s` is the
//! server's CPU over the run and `server_kernel_s` the part of it spent in
//! the kernel (system time).
//! Every message is parsed as JSON and checked (type, topic, text); a
//! message counts only if it was published after the trigger (its
//! timestamp is later), and loss is what was expected minus what came.
//! Latency is receive time minus the timestamp in the text (in S5, minus
//! the message's due time). A `stream.delta` that merges several
//! (`seqStart`, or several timestamps in its text when the server rolled
//! them up) counts as the messages it covers, with the latency of the
//! oldest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A bare WebSocket client: handshake, masked text frames out, unmasked
/// frames in, parsed straight from a read buffer. Or, with `events`, a
/// bare event stream client: the chunked body is decoded into the same
/// buffer, and each event's `data:` line is a text "frame".
struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    events: Option<Chunked>,
}

/// A chunked body being decoded: bytes read but not decoded yet, and how
/// much of the current chunk is left.
#[derive(Default)]
struct Chunked {
    raw: Vec<u8>,
    left: usize,
}

impl Chunked {
    /// Moves what `raw` holds of the body into `out`; `false` once the
    /// last chunk came.
    fn decode(&mut self, out: &mut Vec<u8>) -> bool {
        let mut at = 0;
        loop {
            if self.left > 0 {
                let n = self.left.min(self.raw.len() - at);
                out.extend_from_slice(&self.raw[at..at + n]);
                self.left -= n;
                at += n;
                if self.left > 0 {
                    break;
                }
                // The CRLF after the chunk's data.
                self.left = usize::MAX;
            }
            let Some(eol) = self.raw[at..].windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let line = &self.raw[at..at + eol];
            at += eol + 2;
            if self.left == usize::MAX {
                self.left = 0;
                continue;
            }
            let size = std::str::from_utf8(line)
                .ok()
                .and_then(|l| usize::from_str_radix(l.trim(), 16).ok())
                .unwrap_or(0);
            if size == 0 {
                return false;
            }
            self.left = size;
        }
        self.raw.drain(..at);
        true
    }
}

/// One frame from the server.
enum Frame {
    Text(std::ops::Range<usize>),
    /// A text frame compressed with permessage-deflate (RSV1).
    Compressed(std::ops::Range<usize>),
    Other,
    Closed,
}

/// The extension offered with `--deflate`, as browsers offer it.
const DEFLATE_OFFER: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

impl Ws {
    async fn connect(addr: SocketAddr, deflate: bool) -> Result<Ws, Error> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let offer = if deflate { DEFLATE_OFFER } else { "" };
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut ws = Ws {
            stream,
            // Small at first: 5,000 connections of S4 faulting in 64 KiB
            // each cost this process more than their handshakes.
            buf: vec![0; 4 << 10],
            start: 0,
            end: 0,
            events: None,
        };
        loop {
            if let Some(at) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                if !ws.buf.starts_with(b"HTTP/1.1 101") {
                    return Err("handshake refused".into());
                }
                ws.start = at + 4;
                return Ok(ws);
            }
            let n = ws.stream.read(&mut ws.buf[ws.end..]).await?;
            if n == 0 {
                return Err("closed during handshake".into());
            }
            ws.end += n;
        }
    }

    /// Opens an event stream of `topic`.
    async fn connect_events(addr: SocketAddr, topic: &str) -> Result<Ws, Error> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET /ws?requestId={topic} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err("closed before the response".into());
            }
            head.extend_from_slice(&chunk[..n]);
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                if !head.starts_with(b"HTTP/1.1 200") {
                    return Err("event stream refused".into());
                }
                let mut events = Chunked {
                    raw: head[at + 4..].to_vec(),
                    left: 0,
                };
                let mut buf = Vec::with_capacity(4 << 10);
                events.decode(&mut buf);
                let end = buf.len();
                buf.resize(end.max(4 << 10), 0);
                return Ok(Ws {
                    stream,
                    buf,
                    start: 0,
                    end,
                    events: Some(events),
                });
            }
        }
    }

    async fn send_text(&mut self, text: &str) -> Result<(), Error> {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x81];
        match text.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next frame; a text frame's payload is `self.buf[range]`.
    async fn next(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(frame) = self.next_buffered() {
                return Ok(frame);
            }
            if !self.fill().await? {
                return Ok(Frame::Closed);
            }
        }
    }

    /// The next frame already read, if a whole one is.
    fn next_buffered(&mut self) -> Option<Frame> {
        let (frame, len) = self.parse()?;
        self.start += len;
        Some(frame)
    }

    /// Reads once (up to the buffer); `false` at the end of the stream.
    async fn fill(&mut self) -> Result<bool, Error> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // One frame larger than the buffer.
            self.buf.resize(self.buf.len() * 2, 0);
        }
        if let Some(events) = &mut self.events {
            let mut chunk = [0u8; 16 << 10];
            let n = tokio::time::timeout(STALL, self.stream.read(&mut chunk)).await??;
            events.raw.extend_from_slice(&chunk[..n]);
            self.buf.truncate(self.end);
            let more = events.decode(&mut self.buf);
            self.end = self.buf.len();
            let len = self.buf.len().max(4 << 10);
            self.buf.resize(len, 0);
            return Ok(n > 0 && more);
        }
        let room = self.buf.len() - self.end;
        let n = tokio::time::timeout(STALL, self.stream.read(&mut self.buf[self.end..])).await??;
        self.end += n;
        if n == room && self.buf.len() < MAX_READ {
            // The socket had more: read more at once next time.
            self.buf.resize(self.buf.len() * 2, 0);
        }
        Ok(n > 0)
    }

    fn parse(&self) -> Option<(Frame, usize)> {
        let b = &self.buf[self.start..self.end];
        if self.events.is_some() {
            // One event: lines up to a blank one. Its `data:` line is the
            // message; comments and named events have none taken.
            let mut at = 0;
            let mut data = None;
            let mut named = false;
            loop {
                let eol = at + b[at..].iter().position(|&c| c == b'\n')?;
                if eol == at {
                    let frame = match data {
                        Some(range) if !named => Frame::Text(range),
                        _ => Frame::Other,
                    };
                    return Some((frame, at + 1));
                }
                let line = &b[at..eol];
                if line.starts_with(b"data: ") {
                    data = Some(self.start + at + 6..self.start + eol);
                } else if line.starts_with(b"event:") {
                    named = true;
                }
                at = eol + 1;
            }
        }
        if b.len() < 2 {
            return None;
        }
        let (len, header) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < header + len {
            return None;
        }
        let frame = match b[0] & 0x4F {
            0x1 => Frame::Text(self.start + header..self.start + header + len),
            0x41 => Frame::Compressed(self.start + header..self.start + header + len),
            0x8 => Frame::Closed,
            _ => Frame::Other,
        };
        Some((frame, header + len))
    }
}

/// Inflates compressed messages (permessage-deflate, no context takeover).
struct Inflater {
    inflate: flate2::Decompress,
    out: Vec<u8>,
}

impl Default for Inflater {
    fn default() -> Self {
        Self {
            inflate: flate2::Decompress::new(false),
            out: Vec::with_capacity(4 << 10),
        }
    }
}

impl Inflater {
    fn inflate(&mut self, payload: &[u8]) -> Option<&[u8]> {
        self.inflate.reset(false);
        self.out.clear();
        for input in [payload, &[0x00, 0x00, 0xFF, 0xFF][..]] {
            let start = self.inflate.total_in();
            loop {
                self.out.reserve(4 << 10);
                let read = (self.inflate.total_in() - start) as usize;
                self.inflate
                    .decompress_vec(&input[read..], &mut self.out, flate2::FlushDecompress::Sync)
                    .ok()?;
                let read = (self.inflate.total_in() - start) as usize;
                if read == input.len() && self.out.len() < self.out.capacity() {
                    break;
                }
            }
        }
        Some(&self.out)
    }
}

/// The read buffer grows to this while reads fill it.
const MAX_READ: usize = 64 << 10;

/// Longest wait for anything before a run is declared broken.
const STALL: Duration = Duration::from_secs(60);

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args
        .first()
        .ok_or("usage: loadgen s1|s2|s3|s4|s5 ADDR [options]")?
        .clone();
    let addr: SocketAddr = args.get(1).ok_or("missing ADDR")?.parse()?;
    let opts = Options(args[2..].to_vec());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        match scenario.as_str() {
            "s1" => s1(addr, &opts).await,
            "s2" => s2(addr, &opts).await,
            "s3" => s3(addr, &opts).await,
            "s4" => s4(addr, &opts).await,
            "s5" => s5(addr, &opts).await,
            other => Err(format!("unknown scenario {other}").into()),
        }
    })?;
    println!("{result}");
    Ok(())
}

struct Options(Vec<String>);

impl Options {
    /// Whether `--deflate` was given: offer permessage-deflate.
    fn deflate(&self) -> bool {
        self.0.iter().any(|a| a == "--deflate")
    }

    /// Whether `--transport sse` was given.
    fn events(&self) -> bool {
        self.0
            .iter()
            .position(|a| a == "--transport")
            .and_then(|i| self.0.get(i + 1))
            .is_some_and(|t| t == "sse")
    }

    fn get(&self, name: &str, default: u64) -> u64 {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One text frame of the bench protocol, borrowed from the frame.
#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(rename = "requestId")]
    request_id: &'a str,
    text: &'a str,
    seq: Option<u64>,
    #[serde(rename = "seqStart")]
    seq_start: Option<u64>,
}

/// A JSON parser for flat objects (string, number, `true`, `false`, `null`
/// values), the shape of every bench message: it checks the whole text as
/// JSON, strings' escapes and UTF-8 included, in a fraction of
/// serde_json's time, so that the load generator, on its one core, keeps
/// ahead of the server it measures. Whatever it does not take (nested
/// values, escapes in the fields it returns, fractional numbers where it
/// wants an integer) goes to serde_json, which decides.
mod flat {
    use super::Delta;

    pub(super) fn parse(b: &[u8]) -> Option<Delta<'_>> {
        // UTF-8 checked once for the whole text; strings are then slices
        // of it between ASCII quotes.
        let text = std::str::from_utf8(b).ok()?;
        let mut p = Parser { text, b, at: 0 };
        let mut delta = Delta {
            kind: "",
            request_id: "",
            text: "",
            seq: None,
            seq_start: None,
        };
        let (mut kind, mut request_id, mut text) = (false, false, false);
        p.skip_ws();
        p.expect(b'{')?;
        p.skip_ws();
        if p.peek()? == b'}' {
            return None;
        }
        loop {
            p.skip_ws();
            p.expect(b'"')?;
            let (key, _) = p.string()?;
            p.skip_ws();
            p.expect(b':')?;
            p.skip_ws();
            match p.peek()? {
                b'"' => {
                    p.at += 1;
                    let (value, escaped) = p.string()?;
                    let slot = match key {
                        "type" => Some((&mut delta.kind, &mut kind)),
                        "requestId" => Some((&mut delta.request_id, &mut request_id)),
                        "text" => Some((&mut delta.text, &mut text)),
                        _ => None,
                    };
                    if let Some((field, seen)) = slot {
                        if escaped || *seen {
                            return None;
                        }
                        (*field, *seen) = (value, true);
                    }
                }
                b'-' | b'0'..=b'9' => {
                    let integer = p.number()?;
                    let slot = match key {
                        "seq" => Some(&mut delta.seq),
                        "seqStart" => Some(&mut delta.seq_start),
                        _ => None,
                    };
                    if let Some(field) = slot {
                        if field.is_some() {
                            return None;
                        }
                        *field = Some(integer?);
                    }
                }
                _ => {
                    let word = [&b"true"[..], b"false", b"null"]
                        .into_iter()
                        .find(|w| p.b[p.at..].starts_with(w))?;
                    if matches!(key, "type" | "requestId" | "text" | "seq" | "seqStart") {
                        return None;
                    }
                    p.at += word.len();
                }
            }
            p.skip_ws();
            match p.peek()? {
                b',' => p.at += 1,
                b'}' => {
                    p.at += 1;
                    break;
                }
                _ => return None,
            }
        }
        p.skip_ws();
        (p.at == b.len() && kind && request_id && text).then_some(delta)
    }

    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH_BITS: u64 = u64::from_le_bytes([0x80; 8]);

    /// A high bit set in the first byte of `word` (in memory order) that
    /// is a quote, a backslash or a control character, if there is one;
    /// bytes after it may be marked too. The "has a zero byte" test: a
    /// borrow runs upwards only, from a byte that matched.
    fn special_bytes(word: u64) -> u64 {
        let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH_BITS;
        zero(word ^ (ONES * u64::from(b'"')))
            | zero(word ^ (ONES * u64::from(b'\\')))
            | (word.wrapping_sub(ONES * 0x20) & !word & HIGH_BITS)
    }

    struct Parser<'a> {
        text: &'a str,
        b: &'a [u8],
        at: usize,
    }

    impl<'a> Parser<'a> {
        fn peek(&self) -> Option<u8> {
            self.b.get(self.at).copied()
        }

        fn expect(&mut self, byte: u8) -> Option<()> {
            (self.peek()? == byte).then(|| self.at += 1)
        }

        fn skip_ws(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.at += 1;
            }
        }

        /// A string's contents after its opening quote, and whether it has
        /// escapes; the closing quote is consumed.
        fn string(&mut self) -> Option<(&'a str, bool)> {
            let start = self.at;
            let mut escaped = false;
            loop {
                // Eight bytes at a time up to the first that needs a look.
                while let Some(word) = self.b.get(self.at..self.at + 8) {
                    let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                    let special = special_bytes(word);
                    if special != 0 {
                        self.at += special.trailing_zeros() as usize / 8;
                        break;
                    }
                    self.at += 8;
                }
                let c = self.peek()?;
                self.at += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        escaped = true;
                        match self.peek()? {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                            b'u' => {
                                let hex = self.b.get(self.at + 1..self.at + 5)?;
                                if !hex.iter().all(u8::is_ascii_hexdigit) {
                                    return None;
                                }
                                self.at += 5;
                            }
                            _ => return None,
                        }
                    }
                    0..=0x1F => return None,
                    _ => {}
                }
            }
            Some((&self.text[start..self.at - 1], escaped))
        }

        /// A JSON number; its value if it is an integer that fits a `u64`.
        fn number(&mut self) -> Option<Option<u64>> {
            let start = self.at;
            if self.peek() == Some(b'-') {
                self.at += 1;
            }
            let digits = |p: &mut Self| {
                let from = p.at;
                while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                    p.at += 1;
                }
                p.at - from
            };
            let int_start = self.at;
            let int_digits = digits(self);
            if int_digits == 0 || (int_digits > 1 && self.b[int_start] == b'0') {
                return None;
            }
            let mut integer = true;
            if self.peek() == Some(b'.') {
                self.at += 1;
                integer = false;
                if digits(self) == 0 {
                    return None;
                }
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                self.at += 1;
                integer = false;
                if matches!(self.peek(), Some(b'+' | b'-')) {
                    self.at += 1;
                }
                if digits(self) == 0 {
                    return None;
                }
            }
            let text = std::str::from_utf8(&self.b[start..self.at]).ok()?;
            Some(integer.then(|| text.parse().ok()).flatten())
        }
    }
}

/// What one connection saw after the trigger.
#[derive(Default)]
struct Seen {
    /// Messages counted (a merged delta counts as all it covers).
    messages: u64,
    /// Latencies in microseconds.
    latencies_us: Vec<u32>,
    /// (arrival order among counted messages, receive ns) for S5.
    arrivals: Vec<u64>,
    last_ns: u64,
    invalid: u64,
    merged_frames: u64,
}

/// Reads one connection until it has counted `expected` messages published
/// after `trigger_ns` (markers before it are skipped).
async fn receive(
    mut ws: Ws,
    topic: String,
    trigger: Arc<AtomicU64>,
    expected: u64,
    keep_arrivals: bool,
) -> Seen {
    let mut seen = Seen::default();
    // Frames that came in one read arrived together: one clock reading.
    let mut now = unix_ns();
    let mut inflater = Inflater::default();
    while seen.messages < expected {
        let bytes = match ws.next_buffered() {
            Some(Frame::Text(range)) => &ws.buf[range],
            Some(Frame::Compressed(range)) => match inflater.inflate(&ws.buf[range]) {
                Some(bytes) => bytes,
                None => {
                    seen.invalid += 1;
                    continue;
                }
            },
            Some(Frame::Other) => continue,
            Some(Frame::Closed) => break,
            None => match ws.fill().await {
                Ok(true) => {
                    now = unix_ns();
                    continue;
                }
                _ => break,
            },
        };
        let Some(delta) = flat::parse(bytes).or_else(|| serde_json::from_slice(bytes).ok()) else {
            seen.invalid += 1;
            continue;
        };
        let stamp = delta.text.split(':').next().and_then(decimal);
        let (Some(stamp), true) = (
            stamp,
            delta.kind == "stream.delta" && delta.request_id == topic,
        ) else {
            seen.invalid += 1;
            continue;
        };
        let trigger_ns = trigger.load(Relaxed);
        if trigger_ns == 0 || stamp < trigger_ns {
            continue; // a marker
        }
        // Each message published is `<t>:` and padding without a colon: a
        // frame that merges several (coalesced for a slow reader, or
        // rolled up by the publisher) has one colon per message.
        let colons = delta.text.matches(':').count() as u64;
        let covers = match (delta.seq_start, delta.seq) {
            (Some(first), Some(last)) if last >= first => last - first + 1,
            _ => 1,
        }
        .max(colons);
        if covers > 1 {
            seen.merged_frames += 1;
        }
        let latency = now.saturating_sub(stamp) / 1000;
        for _ in 0..covers {
            seen.latencies_us.push(latency.min(u32::MAX as u64) as u32);
            if keep_arrivals {
                seen.arrivals.push(now);
            }
        }
        seen.messages += covers;
        seen.last_ns = now;
    }
    seen
}

/// Digits as a number, in about half of `str::parse`'s instructions (it
/// also takes a sign); `None` for anything else or past `u64::MAX`.
fn decimal(digits: &str) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.bytes().try_fold(0u64, |n, b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Opens `clients` connections, `inflight` at a time, each subscribed to
/// `topic_of(i)`. Returns them with their handshake times.
async fn connect_all(
    addr: SocketAddr,
    opts: &Options,
    clients: u64,
    inflight: usize,
    topic_of: impl Fn(u64) -> String,
) -> Result<(Vec<(Ws, String)>, Vec<u32>), Error> {
    let events = opts.events();
    let deflate = opts.deflate();
    let gate = Arc::new(Semaphore::new(inflight));
    let mut tasks = Vec::with_capacity(clients as usize);
    for i in 0..clients {
        let topic = topic_of(i);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            let started = Instant::now();
            if events {
                let ws = Ws::connect_events(addr, &topic).await?;
                let handshake_us = started.elapsed().as_micros() as u32;
                return Ok((ws, topic, handshake_us));
            }
            let mut ws = Ws::connect(addr, deflate).await?;
            let handshake_us = started.elapsed().as_micros() as u32;
            ws.send_text(&format!(r#"{{"type":"subscribe","requestId":"{topic}"}}"#))
                .await?;
            Ok::<_, Error>((ws, topic, handshake_us))
        }));
    }
    let mut conns = Vec::with_capacity(tasks.len());
    let mut handshakes = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (ws, topic, us) = task.await??;
        conns.push((ws, topic));
        handshakes.push(us);
    }
    Ok((conns, handshakes))
}

/// POSTs to the server; returns the body.
async fn post(addr: SocketAddr, path_and_query: &str) -> Result<String, Error> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("POST {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(600), stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").ok_or("bad response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{path_and_query}: {head}").into());
    }
    // Either Content-Length or chunked: take the JSON object in it.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |e| e + 1);
    Ok(body[start..end].to_owned())
}

/// Publishes marker rounds until every connection got one, so every
/// subscription is in place before the trigger.
async fn wait_subscribed(
    addr: SocketAddr,
    conns: &mut [(Ws, String)],
    marker: &str,
) -> Result<(), Error> {
    let mut pending: Vec<usize> = (0..conns.len()).collect();
    for _ in 0..200 {
        post(addr, marker).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        let mut still = Vec::new();
        for i in pending {
            let ws = &mut conns[i].0;
            let mut got = false;
            // A marker is any text frame.
            while let Ok(Ok(frame)) = tokio::time::timeout_at(deadline, ws.next()).await {
                match frame {
                    Frame::Text(_) | Frame::Compressed(_) => {
                        got = true;
                        break;
                    }
                    Frame::Other => continue,
                    Frame::Closed => return Err("connection closed".into()),
                }
            }
            if !got {
                still.push(i);
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
    }
    Err(format!("{} connections never got a marker", pending.len()).into())
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A process's CPU time so far, in seconds: in user space and in the
/// kernel (the system calls, and the network stack's work they do).
#[derive(Clone, Copy)]
struct Cpu {
    user: f64,
    kernel: f64,
}

impl Cpu {
    fn of(pid: u64) -> Cpu {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name: utime and stime are the 12th and 13th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let seconds = |i: usize| {
            fields
                .get(i)
                .and_then(|t| t.parse::<u64>().ok())
                .map_or(0.0, |ticks| ticks as f64 / 100.0)
        };
        Cpu {
            user: seconds(11),
            kernel: seconds(12),
        }
    }

    /// What was used from `before` to now.
    fn since(before: Cpu, pid: u64) -> Cpu {
        let now = Cpu::of(pid);
        Cpu {
            user: now.user - before.user,
            kernel: now.kernel - before.kernel,
        }
    }

    fn total(self) -> f64 {
        self.user + self.kernel
    }
}

/// Runs a fan-out: triggers `publish_path` after markers, collects.
async fn fan_out(
    addr: SocketAddr,
    opts: &Options,
    mut conns: Vec<(Ws, String)>,
    marker: &str,
    publish_path: String,
    expected_each: u64,
) -> Result<String, Error> {
    let pid = opts.get("--pid", 0);
    wait_subscribed(addr, &mut conns, marker).await?;
    let trigger = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(ws, topic)| tokio::spawn(receive(ws, topic, trigger.clone(), expected_each, false)))
        .collect();
    let own = u64::from(std::process::id());
    let (cpu_before, own_before) = (Cpu::of(pid), Cpu::of(own));
    let trigger_ns = unix_ns();
    trigger.store(trigger_ns, Relaxed);
    let started = Instant::now();
    let server_report = post(addr, &publish_path).await?;
    let publish_s = started.elapsed().as_secs_f64();
    let mut all = Seen::default();
    let clients = readers.len() as u64;
    for reader in readers {
        let seen = reader.await?;
        all.messages += seen.messages;
        all.invalid += seen.invalid;
        all.merged_frames += seen.merged_frames;
        all.last_ns = all.last_ns.max(seen.last_ns);
        all.latencies_us.extend(seen.latencies_us);
    }
    let elapsed_s = (all.last_ns.saturating_sub(trigger_ns)) as f64 / 1e9;
    let cpu = Cpu::since(cpu_before, pid);
    let own_cpu = Cpu::since(own_before, own).total();
    all.latencies_us.sort_unstable();
    let expected = expected_each * clients;
    Ok(format!(
        "{{\"delivered\":{},\"expected\":{expected},\"lost\":{},\"invalid\":{},\"merged_frames\":{},\"msgs_per_s\":{:.0},\"elapsed_s\":{elapsed_s:.3},\"publish_s\":{publish_s:.3},\"min_us\":{},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"server_rss_kib\":{},\"server_cpu_s\":{:.2},\"server_kernel_s\":{:.2},\"loadgen_cpu_s\":{own_cpu:.2},\"server\":{server_report}}}",
        all.messages,
        expected.saturating_sub(all.messages),
        all.invalid,
        all.merged_frames,
        all.messages as f64 / elapsed_s.max(1e-9),
        all.latencies_us.first().copied().unwrap_or(0),
        percentile(&all.latencies_us, 0.5),
        percentile(&all.latencies_us, 0.99),
        all.latencies_us.last().copied().unwrap_or(0),
        rss_kib(pid),
        cpu.total(),
        cpu.kernel,
    ))
}

async fn s1(addr: SocketAddr, opts: &Options) -> Result<String, Error> {
    let (clients, count, size) = (
        opts.get("--clients", 1000),
        opts.get("--count", 2000),
        opts.get("--size", 128),
    );
    let (conns, _) = connect_all(addr, opts, clients, 64, |_| "s1".to_owned()).await?;
    let marker = format!("/publish?requestId=s1&count=1&size={size}");
    let path = format!("/publish?requestId=s1&count={count}&size={size}");
    fan_out(addr, opts, conns, &marker, path, count).await
}

async fn s2(addr: SocketAddr, opts: &Options) -> Result<String, Error> {
    let (topics, count, size) = (
        opts.get("--topics", 1000),
        opts.get("--count", 200),
        opts.get("--size", 64),
    );
    let (conns, _) = connect_all(addr, opts, topics, 64, |i| format!("s2-{i}")).await?;
    let marker = format!("/publish-many?prefix=s2-&topics={topics}&count=1&size={size}");
    let path = format!("/publish-many?prefix=s2-&topics={topics}&count={count}&size={size}");
    fan_out(addr, opts, conns, &marker, path, count).await
}

async fn s3(addr: SocketAddr, opts: &Options) -> Result<String, Error> {
    let (clients, pid) = (opts.get("--clients", 10_000), opts.get("--pid", 0));
    let before = rss_kib(pid);
    let (mut conns, _) = connect_all(addr, opts, clients, 64, |i| format!("s3-{i}")).await?;
    // Every subscription in place: one marker round to all topics.
    wait_subscribed(
        addr,
        &mut conns,
        &format!("/publish-many?prefix=s3-&topics={clients}&count=1&size=16"),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    Ok(format!(
        "{{\"clients\":{clients},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"bytes_per_conn\":{:.0}}}",
        (after.saturating_sub(before) * 1024) as f64 / clients as f64
    ))
}

async fn s4(addr: SocketAddr, opts: &Options) -> Result<String, Error> {
    let (clients, inflight, pid) = (
        opts.get("--clients", 5000),
        opts.get("--inflight", 64),
        opts.get("--pid", 0),
    );
    let own = u64::from(std::process::id());
    let (cpu_before, own_before) = (Cpu::of(pid), Cpu::of(own));
    let started = Instant::now();
    let (conns, mut handshakes) = connect_all(addr, opts, clients, inflight as usize, |i| {
        format!("s4-{i}")
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = Cpu::since(cpu_before, pid);
    let own_cpu = Cpu::since(own_before, own).total();
    handshakes.sort_unstable();
    drop(conns);
    Ok(format!(
        "{{\"clients\":{clients},\"conns_per_s\":{:.0},\"server_cpu_s\":{:.2},\"server_kernel_s\":{:.2},\"loadgen_cpu_s\":{own_cpu:.2},\"elapsed_s\":{elapsed:.2},\"handshake_p50_us\":{},\"handshake_p99_us\":{}}}",
        clients as f64 / elapsed,
        cpu.total(),
        cpu.kernel,
        percentile(&handshakes, 0.5),
        percentile(&handshakes, 0.99)
    ))
}

async fn s5(addr: SocketAddr, opts: &Options) -> Result<String, Error> {
    let topics = opts.get("--topics", 1000);
    let per_topic = opts.get("--per-topic", 1);
    let (rate, duration, size, pid) = (
        opts.get("--rate", 20_000),
        opts.get("--duration", 5),
        opts.get("--size", 64),
        opts.get("--pid", 0),
    );
    let (mut conns, _) = connect_all(addr, opts, topics * per_topic, 64, |i| {
        format!("s5-{}", i % topics)
    })
    .await?;
    wait_subscribed(
        addr,
        &mut conns,
        &format!("/publish-many?prefix=s5-&topics={topics}&count=1&size={size}"),
    )
    .await?;
    let total = rate * duration;
    let trigger = Arc::new(AtomicU64::new(0));
    let topic_index: HashMap<String, u64> = (0..topics).map(|i| (format!("s5-{i}"), i)).collect();
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(ws, topic)| {
            let i = topic_index[&topic];
            // Messages k ≡ i (mod topics) go to this topic.
            let expected = total / topics + u64::from(i < total % topics);
            (
                i,
                tokio::spawn(receive(ws, topic, trigger.clone(), expected, true)),
            )
        })
        .collect();
    let cpu_before = Cpu::of(pid);
    trigger.store(unix_ns(), Relaxed);
    let report = post(
        addr,
        &format!(
            "/publish-paced?prefix=s5-&topics={topics}&rate={rate}&duration={duration}&size={size}"
        ),
    )
    .await?;
    let cpu = Cpu::since(cpu_before, pid);
    let start_ns: u64 = report
        .split("\"start_unix_ns\":")
        .nth(1)
        .and_then(|r| r.trim_end_matches('}').split(',').next())
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no start_unix_ns")?;
    let mut latencies = Vec::with_capacity((total * per_topic) as usize);
    let (mut delivered, mut invalid) = (0u64, 0u64);
    for (i, reader) in readers {
        let seen = reader.await?;
        delivered += seen.messages;
        invalid += seen.invalid;
        for (j, received) in seen.arrivals.iter().enumerate() {
            let k = j as u64 * topics + i;
            let due = start_ns + (k as f64 * 1e9 / rate as f64) as u64;
            latencies.push((received.saturating_sub(due) / 1000).min(u32::MAX as u64) as u32);
        }
    }
    latencies.sort_unstable();
    let expected = total * per_topic;
    Ok(format!(
        "{{\"delivered\":{delivered},\"expected\":{expected},\"lost\":{},\"invalid\":{invalid},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"server_cpu_s\":{:.2},\"server_kernel_s\":{:.2},\"server\":{report}}}",
        expected.saturating_sub(delivered),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(0),
        cpu.total(),
        cpu.kernel,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(d: Delta<'_>) -> (String, String, String, Option<u64>, Option<u64>) {
        let Delta {
            kind,
            request_id,
            text,
            seq,
            seq_start,
        } = d;
        (kind.into(), request_id.into(), text.into(), seq, seq_start)
    }

    #[test]
    fn the_flat_parser_agrees_with_serde_json_where_it_answers() {
        let taken = [
            r#"{"seq":12,"type":"stream.delta","requestId":"s1","text":"17:xxxx"}"#,
            r#" { "type" : "stream.delta" , "requestId":"a","text":"é ü","seq":1,"seqStart":0 } "#,
            r#"{"type":"t","requestId":"r","text":"","n":-1.5e3,"ok":true,"no":false,"z":null,"s":"a\"\\\/\u00e9\n"}"#,
        ];
        for json in taken {
            let flat = flat::parse(json.as_bytes()).map(fields);
            let serde = serde_json::from_slice::<Delta<'_>>(json.as_bytes()).map(fields);
            assert_eq!(flat, Some(serde.unwrap()), "{json}");
        }
    }

    #[test]
    fn the_flat_parser_finds_a_quote_escape_or_control_byte_wherever_it_is() {
        // At every offset within and across the scan's eight-byte words,
        // after plain and after multi-byte characters.
        for fill in ["x", "é", "€"] {
            for at in 0..24 {
                let before = fill.repeat(at);
                for special in [
                    "\\\"", "\\\\", "\\n", "\\u00e9", "\u{7f}", "\u{1}", "\u{1f}",
                ] {
                    let json = format!(
                        r#"{{"type":"t","requestId":"r","text":"{before}","s":"{before}{special}{before}"}}"#
                    );
                    let flat = flat::parse(json.as_bytes()).map(fields);
                    let serde = serde_json::from_slice::<Delta<'_>>(json.as_bytes()).map(fields);
                    if special < " " {
                        assert!(flat.is_none() && serde.is_err(), "{json}");
                    } else {
                        assert_eq!(flat, Some(serde.unwrap()), "{json}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_stamp_is_digits_and_fits_a_u64() {
        assert_eq!(
            decimal("1764601234567890123"),
            Some(1_764_601_234_567_890_123)
        );
        assert_eq!(decimal("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "18446744073709551616", "+1", "-1", "1x", " 1"] {
            assert_eq!(decimal(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_flat_parser_passes_on_what_it_does_not_take_and_refuses_no_valid_json() {
        let passed_on = [
            r#"{"type":"t","requestId":"r","text":"a","more":{"x":[1,2]}}"#,
            r#"{"type":"t","requestId":"r","text":"a","seq":1.0}"#,
            r#"{"type":"t","requestId":"r","text":"a\nb"}"#,
        ];
        for json in passed_on {
            assert!(flat::parse(json.as_bytes()).is_none(), "{json}");
        }
        let invalid = [
            r#"{"type":"t","requestId":"r","text":"a"} x"#,
            r#"{"type":"t","requestId":"r","text":"a}"#,
            "{\"type\":\"t\",\"requestId\":\"r\",\"text\":\"a\u{1}\"}",
            r#"{"type":"t","requestId":"r","text":"a","s":"\x"}"#,
            r#"{"type":"t","requestId":"r","text":"a","n":01}"#,
            r#"{"type":"t","requestId":"r","text":"a","n":1.}"#,
            r#"{"type":"t","requestId":"r","text":"a",}"#,
            r#"{"type":"t","requestId":"r"}"#,
        ];
        for json in invalid {
            assert!(flat::parse(json.as_bytes()).is_none(), "{json}");
            assert!(
                serde_json::from_slice::<Delta<'_>>(json.as_bytes()).is_err(),
                "{json}"
            );
        }
        let bad_utf8 = b"{\"type\":\"t\",\"requestId\":\"r\",\"text\":\"\xff\"}";
        assert!(flat::parse(bad_utf8).is_none());
    }
}
