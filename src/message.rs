//! Topic messages: a JSON object serialized once, stamped with its topic's
//! sequence number, and framed once.
//!
//! A [`Draft`] is serialized outside any lock, leaving room in front of the
//! object. Under the topic's lock, [`Draft::seal`] writes `{"seq":N,` and the
//! frame header into that room, in place, so the sequence number is taken in
//! publish order without copying the payload. The sealed [`Message`] is then
//! shared, as is, by the topic's history and every subscriber's queue.
//!
//! A `stream.delta` also records where its `requestId` and `text` lie in
//! the frame, so a slow subscriber's queue can merge consecutive deltas
//! ([`MergedDelta`]) without parsing JSON.
//!
//! Other encodings of the same message (a Server-Sent Event, a compressed
//! frame) are made from the frame's payload the first time a subscriber
//! needs one, and kept with it: once per message, not per subscriber, and
//! never when no subscriber uses that transport or extension.

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::Serialize;

use crate::error::PublishError;
use crate::frame;
use crate::frame::deflate::Deflate;

/// Room for the longest header (10 bytes) and `{"seq":<u64>,` (29 bytes).
const HEADROOM: usize = 40;

/// A serialized message waiting for its sequence number.
pub(crate) struct Draft {
    buf: Vec<u8>,
    delta: Option<Spans>,
}

/// Where the contents (inside the quotes) of a delta's `requestId` and
/// `text` strings are, as byte ranges. The first start is never 0 (the
/// object's opening comes first), which makes `Option<Spans>` no larger:
/// it is in every sealed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Spans {
    request_id: (NonZeroU32, u32),
    text: (u32, u32),
}

impl Spans {
    /// `None` past 4 GiB: such a delta is sent as it is, never merged.
    fn new(request_id: (usize, usize), text: (usize, usize)) -> Option<Self> {
        let narrow =
            |(a, b): (usize, usize)| Some((u32::try_from(a).ok()?, u32::try_from(b).ok()?));
        let (id_start, id_end) = narrow(request_id)?;
        Some(Self {
            request_id: (NonZeroU32::new(id_start)?, id_end),
            text: narrow(text)?,
        })
    }

    fn request_id(&self) -> (u32, u32) {
        (self.request_id.0.get(), self.request_id.1)
    }

    /// The same ranges in a buffer that starts `by` bytes later.
    fn shifted(self, by: u32) -> Option<Self> {
        let shift = |(a, b): (u32, u32)| ((a - by) as usize, (b - by) as usize);
        Self::new(shift(self.request_id()), shift(self.text))
    }
}

/// A sealed message: its complete frame, and for a `stream.delta`, its
/// sequence number and layout. Clones share it, so an entry in a queue or
/// in a history is one pointer: a burst to many subscribers queues
/// millions of entries, and their size is memory the kernel must fault in.
#[derive(Clone, Debug)]
pub(crate) struct Message(Arc<Sealed>);

#[derive(Debug)]
struct Sealed {
    frame: Bytes,
    /// The topic's sequence number; 0 for a message to one client.
    seq: u64,
    /// For a `stream.delta`, where its strings lie in `frame`.
    delta: Option<Spans>,
    /// Other encodings, made on first use. Boxed: most messages never
    /// need one, and a message may sit in a history for minutes.
    encodings: OnceLock<Box<Encodings>>,
}

#[derive(Debug, Default)]
struct Encodings {
    /// The Server-Sent Event.
    event: OnceLock<Bytes>,
    /// The frame compressed with the usual and with the small window;
    /// `None` when compressing would not make it smaller.
    deflated: [OnceLock<Option<Bytes>>; 2],
}

impl Sealed {
    fn new(frame: Bytes, seq: u64, delta: Option<Spans>) -> Self {
        Self {
            frame,
            seq,
            delta,
            encodings: OnceLock::new(),
        }
    }
}

impl Draft {
    /// Serializes any value; it must be a JSON object.
    pub(crate) fn json<T: Serialize + ?Sized>(message: &T) -> Result<Self, PublishError> {
        let mut buf = Vec::with_capacity(HEADROOM + 128);
        buf.resize(HEADROOM, 0);
        serde_json::to_writer(&mut buf, message).map_err(PublishError::serialize)?;
        if buf.get(HEADROOM) != Some(&b'{') {
            return Err(PublishError::NotAnObject);
        }
        if has_top_level_key(&buf[HEADROOM..], b"seq") {
            return Err(PublishError::SeqField);
        }
        Ok(Self { buf, delta: None })
    }

    /// `{"type":"stream.delta","requestId":…,"text":…}`, with its layout.
    pub(crate) fn delta(request_id: &str, text: &str) -> Self {
        let mut buf = Vec::with_capacity(HEADROOM + 48 + request_id.len() + text.len());
        buf.resize(HEADROOM, 0);
        buf.extend_from_slice(br#"{"type":"stream.delta","requestId":"#);
        let request_id = write_string(&mut buf, request_id);
        buf.extend_from_slice(br#","text":"#);
        let text = write_string(&mut buf, text);
        buf.push(b'}');
        Self {
            buf,
            delta: Spans::new(request_id, text),
        }
    }

    #[cfg(feature = "redis")]
    /// A JSON object serialized elsewhere (another instance, through a
    /// backplane), copied behind the headroom; a `stream.delta` laid out
    /// as [`Draft::delta`] writes it keeps its layout, so it can still be
    /// merged. `None` if `body` does not look like an object.
    pub(crate) fn from_body(body: &[u8]) -> Option<Self> {
        if body.first() != Some(&b'{') || body.last() != Some(&b'}') {
            return None;
        }
        let mut buf = Vec::with_capacity(HEADROOM + body.len());
        buf.resize(HEADROOM, 0);
        buf.extend_from_slice(body);
        let delta = delta_spans(&buf, HEADROOM);
        Some(Self { buf, delta })
    }

    #[cfg(feature = "redis")]
    /// The JSON object, as serialized (without `seq`).
    pub(crate) fn body(&self) -> &[u8] {
        &self.buf[HEADROOM..]
    }

    /// Stamps `seq` and frames the message.
    pub(crate) fn seal(mut self, seq: u64) -> Message {
        let mut digits = [0u8; 20];
        let empty_object = self.buf.len() == HEADROOM + 2;
        let separator: &[u8] = if empty_object { b"" } else { b"," };
        let prefix = [&br#"{"seq":"#[..], decimal(seq, &mut digits), separator];
        // The prefix replaces the object's opening brace.
        let payload_start = HEADROOM + 1 - prefix.iter().map(|p| p.len()).sum::<usize>();
        let mut at = payload_start;
        for part in prefix {
            self.buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let start = frame::write_header_before(&mut self.buf, payload_start);
        let delta = self.delta.and_then(|spans| spans.shifted(start as u32));
        Message(Arc::new(Sealed::new(
            frame::framed(self.buf, start),
            seq,
            delta,
        )))
    }
}

impl Message {
    /// A frame that is not a topic message (an error to one client, a
    /// message sent to one client).
    pub(crate) fn plain(frame: Bytes) -> Self {
        Self(Arc::new(Sealed::new(frame, 0, None)))
    }

    /// The complete frame, header included.
    pub(crate) fn frame(&self) -> &Bytes {
        &self.0.frame
    }

    fn encodings(&self) -> &Encodings {
        self.0.encodings.get_or_init(Box::default)
    }

    /// The frame to write to a connection that negotiated `deflate`: the
    /// compressed one, made by the first such connection and the same for
    /// all, when the frame is a data frame large enough and compressing
    /// makes it smaller.
    #[inline]
    pub(crate) fn wire(&self, deflate: Option<Deflate>) -> &Bytes {
        let frame = &self.0.frame;
        match deflate {
            Some(deflate) if deflate.wants(frame) => {
                let slot = &self.encodings().deflated[usize::from(deflate.small_window())];
                slot.get_or_init(|| deflate.compress(frame))
                    .as_ref()
                    .unwrap_or(frame)
            }
            _ => frame,
        }
    }

    /// The message as one Server-Sent Event: `id:` its `seq` (a topic
    /// message only), `data:` the frame's JSON.
    pub(crate) fn event(&self) -> &Bytes {
        self.encodings()
            .event
            .get_or_init(|| event(self.0.seq, frame::payload(&self.0.frame)))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.frame.len()
    }

    fn delta(&self) -> Option<(u64, Spans)> {
        self.0.delta.map(|spans| (self.0.seq, spans))
    }

    fn slice(&self, (a, b): (u32, u32)) -> Bytes {
        self.0.frame.slice(a as usize..b as usize)
    }

    /// Whether `other` is a delta of the same topic as this delta.
    fn same_topic_delta(&self, other: &Message) -> bool {
        match (self.delta(), other.delta()) {
            (Some((_, a)), Some((_, b))) => {
                let range = |(x, y): (u32, u32)| x as usize..y as usize;
                self.frame()[range(a.request_id())] == other.frame()[range(b.request_id())]
            }
            _ => false,
        }
    }
}

/// Consecutive deltas of one topic, merged into one without copying their
/// text until the merged frame is written.
#[derive(Debug)]
pub(crate) struct MergedDelta {
    request_id: Bytes,
    seq_start: u64,
    seq_end: u64,
    texts: Vec<Bytes>,
    text_len: usize,
    /// The first delta, kept to recognise later deltas of its topic.
    first: Message,
}

/// The bytes a merged frame adds around its text, besides the header:
/// `{"seq":N,"type":"stream.delta","requestId":"…","text":"…","seqStart":M}`.
const MERGED_OVERHEAD: usize = 110;

impl MergedDelta {
    /// Starts a merge with `first`; `None` if it is not a delta.
    pub(crate) fn start(first: &Message) -> Option<Self> {
        let (seq, spans) = first.delta()?;
        let text = first.slice(spans.text);
        Some(Self {
            request_id: first.slice(spans.request_id()),
            seq_start: seq,
            seq_end: seq,
            text_len: text.len(),
            texts: vec![text],
            first: first.clone(),
        })
    }

    /// Appends `next` if it is the following delta of the same topic.
    pub(crate) fn append(&mut self, next: &Message) -> bool {
        match next.delta() {
            Some((seq, spans)) if self.first.same_topic_delta(next) && seq > self.seq_end => {
                let text = next.slice(spans.text);
                self.text_len += text.len();
                self.texts.push(text);
                self.seq_end = seq;
                true
            }
            _ => false,
        }
    }

    /// The size its frame will have, near enough for queue accounting.
    pub(crate) fn len(&self) -> usize {
        MERGED_OVERHEAD + self.request_id.len() + self.text_len
    }

    /// Builds the merged frame: the last sequence number as `seq`, the
    /// first as `seqStart`, the texts concatenated (JSON escaping is per
    /// character, so escaped texts concatenate into the escaped whole).
    pub(crate) fn build(&self) -> Message {
        if self.texts.len() == 1 {
            return self.first.clone();
        }
        let mut buf = Vec::with_capacity(HEADROOM + self.len());
        buf.resize(HEADROOM, 0);
        let mut digits = [0u8; 20];
        buf.extend_from_slice(br#"{"seq":"#);
        buf.extend_from_slice(decimal(self.seq_end, &mut digits));
        buf.extend_from_slice(br#","type":"stream.delta","requestId":""#);
        buf.extend_from_slice(&self.request_id);
        buf.extend_from_slice(br#"","text":""#);
        for text in &self.texts {
            buf.extend_from_slice(text);
        }
        buf.extend_from_slice(br#"","seqStart":"#);
        buf.extend_from_slice(decimal(self.seq_start, &mut digits));
        buf.push(b'}');
        let start = frame::write_header_before(&mut buf, HEADROOM);
        Message(Arc::new(Sealed::new(
            frame::framed(buf, start),
            self.seq_end,
            None,
        )))
    }
}

/// A Server-Sent Event carrying `data`, with `id: seq` unless `seq` is 0.
/// serde_json writes no line breaks, but JSON from elsewhere (a backplane)
/// may have some between tokens: each line goes in a `data:` line of its
/// own, and the reader joins them with `\n`, still whitespace to JSON.
fn event(seq: u64, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 32);
    if seq != 0 {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(decimal(seq, &mut [0; 20]));
        out.push(b'\n');
    }
    for line in data.split(|&b| b == b'\n' || b == b'\r') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out.into()
}

#[cfg(feature = "redis")]
/// Finds the layout of a delta written by [`Draft::delta`] in `buf` from
/// `start` on; `None` for anything else.
fn delta_spans(buf: &[u8], start: usize) -> Option<Spans> {
    const HEAD: &[u8] = br#"{"type":"stream.delta","requestId":""#;
    const MIDDLE: &[u8] = br#"","text":""#;
    let rest = buf.get(start..)?.strip_prefix(HEAD)?;
    let request_id_start = start + HEAD.len();
    let request_id_end = request_id_start + string_len(rest)?;
    let rest = buf[request_id_end..].strip_prefix(MIDDLE)?;
    let text_start = request_id_end + MIDDLE.len();
    let text_end = text_start + string_len(rest)?;
    if &buf[text_end..] != br#""}"# {
        return None;
    }
    Spans::new((request_id_start, request_id_end), (text_start, text_end))
}

#[cfg(feature = "redis")]
/// The length of a JSON string's contents, up to its closing quote.
fn string_len(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// Whether the JSON object `json` (compact, as serde_json writes it) has
/// the key `key` at its top level. One pass, no parsing into values.
fn has_top_level_key(json: &[u8], key: &[u8]) -> bool {
    let mut depth = 0usize;
    // Whether the next string at depth 1 is a key.
    let mut key_next = false;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'{' => {
                depth += 1;
                key_next = depth == 1;
            }
            b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            b',' if depth == 1 => key_next = true,
            b'"' => {
                let start = i + 1;
                i = start;
                while json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                if key_next && &json[start..i] == key {
                    return true;
                }
                key_next = false;
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// `n` in decimal, written at the end of `digits`. `core::fmt` took
/// several times as long, and every message published is numbered.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

/// Writes `s` as a JSON string; returns the range of its contents.
fn write_string(buf: &mut Vec<u8>, s: &str) -> (usize, usize) {
    let start = buf.len() + 1;
    // JSON escapes only quotes, backslashes and control characters; most
    // texts have none, and checking all bytes without stopping early is a
    // few vector instructions, where serde_json looks each byte up.
    let plain = !s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        serde_json::to_writer(&mut *buf, s).expect("a str serializes");
    }
    (start, buf.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn payload(frame: &[u8]) -> Value {
        serde_json::from_slice(crate::frame::payload(frame)).unwrap()
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for text in [
            "",
            "plain",
            "é ü 漢",
            "q\"uote",
            "back\\slash",
            "tab\t",
            "\u{1}",
            "\u{7f}",
        ] {
            let mut buf = Vec::new();
            let (a, b) = write_string(&mut buf, text);
            assert_eq!(buf, serde_json::to_vec(text).unwrap(), "{text:?}");
            assert_eq!((a, b), (1, buf.len() - 1));
        }
    }

    fn negotiated(offer: &'static str) -> Option<Deflate> {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            hyper::header::SEC_WEBSOCKET_EXTENSIONS,
            hyper::header::HeaderValue::from_static(offer),
        );
        let settings = crate::frame::deflate::Settings {
            level: 1,
            threshold: 256,
        };
        crate::frame::deflate::negotiate(&headers, settings).map(|(deflate, _)| deflate)
    }

    #[test]
    fn a_message_is_compressed_once_for_every_connection_that_negotiated_it() {
        let usual = negotiated("permessage-deflate");
        let small = negotiated("permessage-deflate; server_max_window_bits=10");
        let text = "Found 10 great places for pizza near you. ".repeat(20);
        let m = Draft::json(&json!({"type": "stream.done", "fullText": text}))
            .unwrap()
            .seal(3);
        let compressed = m.wire(usual);
        assert_eq!(compressed[0], 0xC1);
        assert!(compressed.len() < m.len() / 4);
        assert_eq!(m.wire(usual).as_ptr(), compressed.as_ptr(), "made once");
        assert_ne!(
            m.wire(small).as_ptr(),
            compressed.as_ptr(),
            "its own window"
        );
        assert_eq!(m.wire(None), m.frame());

        let delta = Draft::delta("t", "a few words").seal(4);
        assert_eq!(delta.wire(usual), delta.frame(), "under the threshold");
    }

    #[test]
    fn decimal_writes_what_display_writes() {
        let mut digits = [0u8; 20];
        for n in [0, 7, 10, 99, 1_000_000_007, u64::MAX - 1, u64::MAX] {
            assert_eq!(decimal(n, &mut digits), n.to_string().as_bytes());
        }
    }

    #[test]
    fn seal_stamps_seq_first() {
        let m = Draft::json(&json!({"type":"x","n":1})).unwrap().seal(7);
        assert_eq!(payload(m.frame()), json!({"seq":7,"type":"x","n":1}));
        assert!(m.frame().starts_with(&[0x81]));
        let m = Draft::json(&json!({})).unwrap().seal(u64::MAX);
        assert_eq!(payload(m.frame()), json!({"seq":u64::MAX}));
    }

    #[test]
    fn non_objects_are_refused() {
        assert!(matches!(
            Draft::json(&"text"),
            Err(PublishError::NotAnObject)
        ));
        assert!(matches!(
            Draft::json(&[1, 2]),
            Err(PublishError::NotAnObject)
        ));
    }

    #[test]
    fn deltas_merge_into_one_frame_with_the_concatenated_text() {
        let texts = ["Hé \"quoted\" ", "line\n", "end"];
        let messages: Vec<Message> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Draft::delta("req-1", t).seal(i as u64 + 4))
            .collect();
        assert_eq!(
            payload(messages[0].frame()),
            json!({"seq":4,"type":"stream.delta","requestId":"req-1","text":"Hé \"quoted\" "})
        );
        let mut merged = MergedDelta::start(&messages[0]).unwrap();
        assert!(merged.append(&messages[1]));
        assert!(merged.append(&messages[2]));
        assert!(!merged.append(&Draft::delta("req-2", "x").seal(7)));
        assert!(!merged.append(&Draft::json(&json!({"t":1})).unwrap().seal(7)));
        let merged = merged.build();
        assert_eq!(
            payload(merged.frame()),
            json!({"seq":6,"type":"stream.delta","requestId":"req-1","text":texts.concat(),"seqStart":4})
        );
    }

    #[cfg(feature = "redis")]
    #[test]
    fn bodies_from_elsewhere_keep_a_deltas_layout() {
        let written = Draft::delta("r\"1", "a \\ \"b\"");
        let copied = Draft::from_body(written.body()).unwrap();
        assert_eq!(copied.delta, written.delta);
        let other =
            Draft::from_body(br#"{"type":"stream.delta","requestId":"r","text":"x","more":1}"#);
        assert_eq!(other.unwrap().delta, None);
        assert!(Draft::from_body(b"[1]").is_none());
        let m = Draft::from_body(br#"{"type":"status"}"#).unwrap().seal(3);
        assert_eq!(payload(m.frame()), json!({"seq":3,"type":"status"}));
    }

    #[test]
    fn a_long_delta_keeps_its_layout_after_a_long_header() {
        let text = "x".repeat(70_000);
        let m = Draft::delta("r", &text).seal(1);
        assert_eq!(m.frame()[1], 127);
        let mut merged = MergedDelta::start(&m).unwrap();
        assert!(merged.append(&Draft::delta("r", "y").seal(2)));
        let v = payload(merged.build().frame());
        assert_eq!(v["text"].as_str().unwrap().len(), 70_001);
    }

    #[test]
    fn spans_past_4_gib_are_not_kept() {
        let big = u32::MAX as usize + 1;
        assert!(Spans::new((1, 2), (3, big - 1)).is_some());
        assert!(Spans::new((1, 2), (3, big)).is_none());
        assert!(Spans::new((big, big + 1), (3, 4)).is_none());
    }

    #[test]
    fn a_seq_of_its_own_is_refused_at_the_top_level_only() {
        assert!(matches!(
            Draft::json(&json!({"type": "x", "seq": 99})),
            Err(PublishError::SeqField)
        ));
        for fine in [
            json!({"type": "x", "nested": {"seq": 1}}),
            json!({"list": [{"seq": 1}], "text": "\"seq\":2"}),
            json!({"se\"q": 1, "seqs": 2}),
            json!({}),
        ] {
            assert!(Draft::json(&fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn the_event_is_made_once_and_splits_lines() {
        let m = Draft::json(&json!({"type":"x"})).unwrap().seal(9);
        assert_eq!(
            &m.event()[..],
            b"id: 9\ndata: {\"seq\":9,\"type\":\"x\"}\n\n"
        );
        assert!(
            std::ptr::eq(m.event(), m.clone().event()),
            "kept with the message"
        );
        let raw = event(0, b"{\n\"a\":1\r\n}");
        assert_eq!(&raw[..], b"data: {\ndata: \"a\":1\ndata: \ndata: }\n\n");
    }
}
