//! permessage-deflate (RFC 7692), without context takeover either way.
//!
//! Every accepted offer is answered with `server_no_context_takeover` and
//! `client_no_context_takeover`, so each message is compressed and
//! inflated on its own. That is what lets a message be compressed once and
//! the same frame go to every subscriber that negotiated the extension, and
//! what keeps a connection from holding a compressor or an inflater (tens
//! of KiB each) between messages: the ones in use belong to the worker
//! thread.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use hyper::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_EXTENSIONS};

use super::{header_before, payload, FIN, MAX_HEADER};

/// Marks a compressed message on its first frame (RFC 7692 §6).
pub(crate) const RSV1: u8 = 0x40;
/// What a sync flush ends with; the sender leaves it off (RFC 7692 §7.2.1).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];
/// An empty final block: inflating up to it proves the message ended on a
/// block boundary, not cut off inside one.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];
/// The window a compressor uses unless the client asks for less.
const MAX_WINDOW_BITS: u8 = 15;
/// The window used for a client that asks for a smaller one (9 to 14
/// bits): zlib cannot compress with 8, and one smaller window keeps the
/// number of shared encodings of a message at two.
const SMALL_WINDOW_BITS: u8 = 9;

/// The layer's compression settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) level: u8,
    pub(crate) threshold: u32,
}

/// What one connection negotiated: how its outbound messages are
/// compressed. Its inbound messages may be compressed too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Deflate {
    level: u8,
    window_bits: u8,
    threshold: u32,
}

/// The first offer of permessage-deflate in the request that can be
/// accepted, and the response's `Sec-WebSocket-Extensions`. Offers with
/// parameters that are unknown, repeated, malformed or not supported are
/// declined one by one (RFC 7692 §5); declining them all leaves the
/// connection uncompressed, never fails the handshake.
pub(crate) fn negotiate(headers: &HeaderMap, settings: Settings) -> Option<(Deflate, HeaderValue)> {
    let offers = headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    for offer in offers {
        let Some(accepted) = accept(offer) else {
            continue;
        };
        let response = match accepted.server_window {
            None => "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
                .to_owned(),
            Some(bits) => format!(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits={bits}"
            ),
        };
        let deflate = Deflate {
            level: settings.level,
            window_bits: accepted.server_window.unwrap_or(MAX_WINDOW_BITS),
            threshold: settings.threshold,
        };
        return Some((deflate, HeaderValue::from_str(&response).ok()?));
    }
    None
}

struct Accepted {
    /// The window the response names, when the offer limited it.
    server_window: Option<u8>,
}

/// Whether `offer` is permessage-deflate with parameters this server can
/// honour (RFC 7692 §7.1).
fn accept(offer: &str) -> Option<Accepted> {
    let mut params = offer.split(';').map(str::trim);
    if !params.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    const NAMES: [&str; 4] = [
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    ];
    let mut seen = [false; 4];
    let mut server_window = None;
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim_end(), Some(unquote(value.trim_start())?)),
            None => (param, None),
        };
        let index = NAMES.iter().position(|n| *n == name)?;
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
        match (index, value) {
            // Context takeover is off both ways whatever the offer says.
            (0 | 1, None) | (3, None) => {}
            (2, Some(value)) => server_window = Some(window_bits(value)?),
            // A hint of the window the client will use: inflating with the
            // largest window reads any.
            (3, Some(value)) => {
                window_bits(value)?;
            }
            _ => return None,
        }
    }
    let server_window = match server_window {
        None => None,
        Some(MAX_WINDOW_BITS) => Some(MAX_WINDOW_BITS),
        Some(8) => return None,
        Some(_) => Some(SMALL_WINDOW_BITS),
    };
    Some(Accepted { server_window })
}

/// A parameter value, its quotes removed.
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"'),
        None => Some(value),
    }
}

/// A window size: 8 to 15, digits only, no leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    /// This thread's compressors, one per level and window in use.
    static COMPRESSORS: RefCell<Vec<(u8, u8, Compress)>> = const { RefCell::new(Vec::new()) };
    /// This thread's inflater.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

impl Deflate {
    /// Whether `frame` (one this crate built) is compressed for this
    /// connection: a data frame whose payload reaches the threshold.
    pub(crate) fn wants(&self, frame: &[u8]) -> bool {
        matches!(frame.first(), Some(0x81 | 0x82))
            && payload(frame).len() >= self.threshold as usize
    }

    /// Whether this connection reads frames compressed with the smaller
    /// window, an encoding of its own beside the usual one.
    pub(crate) fn small_window(&self) -> bool {
        self.window_bits < MAX_WINDOW_BITS
    }

    /// `frame` (a final data frame this crate built) compressed, RSV1 set;
    /// `None` when that would not make it smaller.
    pub(crate) fn compress(&self, frame: &[u8]) -> Option<Bytes> {
        let input = payload(frame);
        let mut buf = Vec::with_capacity(MAX_HEADER + input.len() / 2 + 64);
        buf.resize(MAX_HEADER, 0);
        COMPRESSORS.with_borrow_mut(|compressors| {
            let index = match compressors
                .iter()
                .position(|(level, bits, _)| (*level, *bits) == (self.level, self.window_bits))
            {
                Some(index) => index,
                None => {
                    let level = Compression::new(u32::from(self.level));
                    let compress = Compress::new_with_window_bits(level, false, self.window_bits);
                    compressors.push((self.level, self.window_bits, compress));
                    compressors.len() - 1
                }
            };
            let compress = &mut compressors[index].2;
            compress.reset();
            // Always to the end of the flush: zlib-rs's level 1 does not come
            // back from a reset after a flush left half done.
            loop {
                buf.reserve(64.max(buf.len() / 2));
                let consumed = compress.total_in() as usize;
                compress
                    .compress_vec(&input[consumed..], &mut buf, FlushCompress::Sync)
                    .ok()?;
                // A sync flush is complete once it leaves output room unused.
                if compress.total_in() as usize == input.len() && buf.len() < buf.capacity() {
                    return Some(());
                }
            }
        })?;
        if !buf.ends_with(&SYNC_TAIL) {
            return None;
        }
        buf.truncate(buf.len() - SYNC_TAIL.len());
        if buf.len() >= MAX_HEADER + input.len() {
            return None;
        }
        // Kept as long as the message, maybe in a history: no spare room.
        buf.shrink_to_fit();
        let start = header_before(&mut buf, MAX_HEADER, FIN | RSV1 | (frame[0] & 0x0F));
        Some(super::framed(buf, start))
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates to more than the limit.
    TooBig,
    /// It is not valid deflate data, or ends inside a block.
    Corrupt,
}

/// Inflates the compressed payload of one message into `out` (cleared
/// first). Stops with [`InflateError::TooBig`] as soon as the output passes
/// `max` bytes, so a small message that inflates to gigabytes costs at most
/// `max` bytes of memory.
pub(crate) fn inflate(
    compressed: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    INFLATER.with_borrow_mut(|inflater| {
        let inflater = inflater.get_or_insert_with(|| Decompress::new(false));
        inflater.reset(false);
        out.clear();
        for input in [compressed, &SYNC_TAIL, &FINAL_BLOCK] {
            let start = inflater.total_in();
            loop {
                if out.len() == out.capacity() {
                    // One byte past the limit tells a message over it.
                    let room = (max + 1).saturating_sub(out.len());
                    if room == 0 {
                        return Err(InflateError::TooBig);
                    }
                    out.reserve(room.min(out.len().max(compressed.len() * 2).max(256)));
                }
                let consumed = (inflater.total_in() - start) as usize;
                let status = inflater
                    .decompress_vec(&input[consumed..], out, FlushDecompress::None)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    return Ok(());
                }
                let consumed = (inflater.total_in() - start) as usize;
                if consumed == input.len() && out.len() < out.capacity() {
                    break;
                }
            }
        }
        // The final block was read and the stream did not end.
        Err(InflateError::Corrupt)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(value: &str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(value).unwrap(),
        );
        let settings = Settings {
            level: 1,
            threshold: 0,
        };
        negotiate(&headers, settings).map(|(_, v)| v.to_str().unwrap().to_owned())
    }

    const PLAIN: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn offers_are_accepted_without_context_takeover() {
        // Chromium's and Firefox's offer.
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits").as_deref(),
            Some(PLAIN)
        );
        assert_eq!(offer("permessage-deflate").as_deref(), Some(PLAIN));
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=\"15\"").unwrap(),
            format!("{PLAIN}; server_max_window_bits=15")
        );
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=12; client_no_context_takeover")
                .unwrap(),
            format!("{PLAIN}; server_max_window_bits=9")
        );
    }

    #[test]
    fn offers_it_cannot_honour_are_declined_one_by_one() {
        for declined in [
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; mystery",
        ] {
            assert_eq!(offer(declined), None, "{declined}");
        }
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=8, permessage-deflate").as_deref(),
            Some(PLAIN)
        );
    }

    fn deflate(window_bits: u8) -> Deflate {
        Deflate {
            level: 1,
            window_bits,
            threshold: 0,
        }
    }

    #[test]
    fn a_compressed_frame_inflates_to_the_message() {
        let json = format!(
            r#"{{"type":"stream.done","text":"{}"}}"#,
            "answer ".repeat(300)
        );
        for bits in [15, 9] {
            let frame =
                crate::frame::json_text(&serde_json::from_str::<serde_json::Value>(&json).unwrap())
                    .unwrap();
            let compressed = deflate(bits).compress(&frame).unwrap();
            assert_eq!(compressed[0], 0xC1, "FIN, RSV1, text");
            assert!(compressed.len() < frame.len() / 4);
            let mut out = Vec::new();
            inflate(payload(&compressed), 1 << 20, &mut out).unwrap();
            assert_eq!(out, payload(&frame));
        }
    }

    #[test]
    fn incompressible_and_control_frames_stay_as_they_are() {
        let frame = crate::frame::binary(&[7]);
        assert_eq!(deflate(15).compress(&frame), None);
        assert!(!deflate(15).wants(&crate::frame::ping()));
        assert!(deflate(15).wants(&frame));
    }

    #[test]
    fn a_compressor_goes_on_after_data_that_does_not_compress() {
        // Like the bytes of a photograph: gradients under noise, which
        // level 1 barely compresses.
        let mut state = 1u32;
        let image: Vec<u8> = (0..70_000u32)
            .map(|i| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                ((i % 512) / 2) as u8 ^ ((state >> 16) as u8 & 0x3f)
            })
            .collect();
        for len in [16, 64, 256, 1024, 4096, 16384] {
            for at in (0..image.len() - len).step_by(997).take(60) {
                let frame = crate::frame::binary(&image[at..at + len]);
                if let Some(compressed) = deflate(15).compress(&frame) {
                    let mut out = Vec::new();
                    inflate(payload(&compressed), 1 << 20, &mut out).unwrap();
                    assert_eq!(out, &image[at..at + len]);
                }
            }
        }
    }

    #[test]
    fn inflating_stops_at_the_limit() {
        let zeros = crate::frame::binary(&vec![0; 1 << 20]);
        let compressed = deflate(15).compress(&zeros).unwrap();
        assert!(compressed.len() < 16 << 10, "{}", compressed.len());
        let mut out = Vec::new();
        assert_eq!(
            inflate(payload(&compressed), 1000, &mut out),
            Err(InflateError::TooBig)
        );
        assert!(out.capacity() <= 1001, "{}", out.capacity());
        assert_eq!(inflate(payload(&compressed), 1 << 20, &mut out), Ok(()));
        assert_eq!(out.len(), 1 << 20);
    }

    #[test]
    fn corrupt_or_cut_data_is_refused() {
        let mut out = Vec::new();
        assert_eq!(
            inflate(&[0xFF, 0xFF], 100, &mut out),
            Err(InflateError::Corrupt)
        );
        let frame = crate::frame::text("hello hello hello hello".as_bytes());
        let compressed = deflate(15).compress(&frame).unwrap();
        let cut = &payload(&compressed)[..payload(&compressed).len() - 2];
        assert_eq!(inflate(cut, 100, &mut out), Err(InflateError::Corrupt));
        // A message may end with a final block of its own.
        assert_eq!(inflate(&[0x03, 0x00], 100, &mut out), Ok(()));
        assert!(out.is_empty());
    }
}
