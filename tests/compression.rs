//! permessage-deflate over real sockets: what is negotiated, which frames
//! go out compressed, and what compressed client input gets. The client
//! here writes its frames by hand (with flate2, the crate's own
//! dependency) so it can also send what a careless or hostile client would;
//! browsers, Node's `ws`, Python's `websockets` and the Autobahn
//! TestSuite's compression cases are run by `.ci/run`.

mod support;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// A client on a raw socket that speaks permessage-deflate by hand.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The response's `Sec-WebSocket-Extensions`, if any.
    extensions: Option<String>,
}

impl Raw {
    async fn connect(server: &Server, offer: Option<&str>) -> Raw {
        let extra = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(handshake_request("/ws", &extra).as_bytes())
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            within(stream.read_exact(&mut byte)).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        });
        Raw {
            stream,
            buf: Vec::new(),
            extensions,
        }
    }

    /// Sends one masked frame with `first` as its first byte.
    async fn send_frame(&mut self, first: u8, payload: &[u8]) {
        // The server may close before it has read everything.
        let _ = self
            .stream
            .write_all(&client_frame(first, payload, false))
            .await;
    }

    /// Sends `text` as one compressed text message.
    async fn send_compressed(&mut self, text: &str) {
        self.send_frame(0xC1, &compress(text.as_bytes())).await;
    }

    /// The next frame: its first byte and payload; `None` once the server
    /// hung up.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((header, len)) = server_frame(&self.buf) {
                let first = self.buf[0];
                let payload = self.buf[header..header + len].to_vec();
                self.buf.drain(..header + len);
                return Some((first, payload));
            }
            let mut chunk = [0u8; 65536];
            match within(self.stream.read(&mut chunk)).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next data message, inflated if it came compressed, and whether
    /// it did.
    async fn message(&mut self) -> (Value, bool) {
        loop {
            let (first, payload) = self.frame().await.expect("a message");
            match first & 0x0F {
                0x9 | 0xA => continue,
                0x1 => {
                    let compressed = first & 0x40 != 0;
                    let bytes = if compressed {
                        inflate(&payload, 15)
                    } else {
                        payload
                    };
                    return (serde_json::from_slice(&bytes).unwrap(), compressed);
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// The close code the server sends, skipping data; `None` if it hung
    /// up without one.
    async fn close_code(&mut self) -> Option<u16> {
        while let Some((first, payload)) = self.frame().await {
            if first & 0x0F == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }
}

/// `data` deflated as a client without context takeover sends it.
fn compress(data: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    compress
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&SYNC_TAIL) && out.len() < out.capacity());
    out.truncate(out.len() - SYNC_TAIL.len());
    out
}

/// A compressed payload inflated with a window of `window_bits`, as a
/// client that asked for that window does, output taken a little at a time.
fn inflate(payload: &[u8], window_bits: u8) -> Vec<u8> {
    let mut inflate = Decompress::new_with_window_bits(false, window_bits);
    let input = [payload, &SYNC_TAIL[..]].concat();
    let mut out = Vec::new();
    let mut chunk = [0u8; 64];
    loop {
        let (read, wrote) = (inflate.total_in(), inflate.total_out());
        inflate
            .decompress(&input[read as usize..], &mut chunk, FlushDecompress::Sync)
            .expect("inflates within the window");
        out.extend_from_slice(&chunk[..(inflate.total_out() - wrote) as usize]);
        if inflate.total_in() as usize == input.len() && inflate.total_out() - wrote < 64 {
            return out;
        }
    }
}

fn subscribe(topic: &str) -> String {
    json!({"type": "subscribe", "requestId": topic}).to_string()
}

/// A `stream.done` of a few KiB, as an assistant's whole answer is.
fn answer(topic: &str) -> Value {
    json!({
        "type": "stream.done",
        "requestId": topic,
        "fullText": "Found 10 great places for pizza near you. ".repeat(60),
    })
}

async fn compressing_server() -> Server {
    axum_server(builder().compression(true)).await
}

#[tokio::test]
async fn large_messages_go_out_compressed_to_clients_that_offered_it() {
    let server = compressing_server().await;
    // Chromium's offer, and a client that offers nothing.
    let mut deflating =
        Raw::connect(&server, Some("permessage-deflate; client_max_window_bits")).await;
    let mut plain = Raw::connect(&server, None).await;
    assert_eq!(
        deflating.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    assert_eq!(plain.extensions, None);

    // The compressed subscribe is read like any other.
    deflating.send_compressed(&subscribe("t")).await;
    plain.send_frame(0x81, subscribe("t").as_bytes()).await;
    for client in [&mut deflating, &mut plain] {
        let (ack, compressed) = client.message().await;
        assert_eq!(ack["type"], "subscribed");
        assert!(!compressed, "under the threshold");
    }

    server.publisher.publish("t", &answer("t")).unwrap();
    server.publisher.stream_delta("t", "a few words");
    let (done, compressed) = deflating.message().await;
    assert!(compressed);
    let (same, uncompressed) = plain.message().await;
    assert!(!uncompressed);
    assert_eq!(done, same);
    assert_eq!(done["fullText"], answer("t")["fullText"]);
    for client in [&mut deflating, &mut plain] {
        let (delta, compressed) = client.message().await;
        assert_eq!(delta["text"], "a few words");
        assert!(!compressed, "a delta under the threshold goes out as it is");
    }
}

#[tokio::test]
async fn a_client_that_limits_the_window_gets_frames_it_can_inflate() {
    // Level 1 codes letters with fixed Huffman codes, 8 bits each: only
    // matches would make the message below smaller.
    let server = axum_server(builder().compression(true).compression_level(6)).await;
    let mut client = Raw::connect(
        &server,
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        client.extensions.as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=9"
        )
    );
    client.send_frame(0x81, subscribe("w").as_bytes()).await;
    client.message().await;
    // Letters that repeat only 1,000 bytes back: a frame compressed with
    // the usual window refers that far, which a 512-byte window cannot.
    let mut state = 7u32;
    let block: String = (0..1000)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            char::from(b'a' + (state >> 16) as u8 % 26)
        })
        .collect();
    let text = block.repeat(3);
    server
        .publisher
        .publish("w", &json!({"type": "recommendation", "text": text}))
        .unwrap();
    let (first, payload) = client.frame().await.unwrap();
    assert_eq!(first, 0xC1);
    // Inflaters do not hold a sender to the window it was given (zlib-rs
    // keeps whatever it inflated), so the check is the size: with matches
    // 1,000 bytes back the 3,000 letters would take under 1,000 bytes.
    assert!(payload.len() > 1500, "{} bytes", payload.len());
    let message: Value = serde_json::from_slice(&inflate(&payload, 9)).unwrap();
    assert_eq!(message["text"], text);
}

#[tokio::test]
async fn offers_that_cannot_be_honoured_leave_the_connection_uncompressed() {
    let server = compressing_server().await;
    let client = Raw::connect(
        &server,
        Some("permessage-deflate; server_max_window_bits=8"),
    )
    .await;
    assert_eq!(client.extensions, None);
    let client = Raw::connect(
        &server,
        Some("permessage-deflate; mystery=1, permessage-deflate"),
    )
    .await;
    assert!(client.extensions.is_some(), "the second offer is accepted");

    let off = axum_server(builder()).await;
    let mut client = Raw::connect(&off, Some("permessage-deflate")).await;
    assert_eq!(client.extensions, None, "compression is off by default");
    client.send_compressed(&subscribe("x")).await;
    assert_eq!(client.close_code().await, Some(1002));
}

#[tokio::test]
async fn compressed_input_is_held_to_the_size_limit_once_inflated() {
    let server = axum_server(builder().compression(true).max_message_size(64 << 10)).await;
    let offer = Some("permessage-deflate");

    // 8 MiB of spaces deflate to a few KiB: refused once past 64 KiB.
    let bomb = format!(
        "{{\"type\":\"subscribe\",\"requestId\":\"{}\"}}",
        " ".repeat(8 << 20)
    );
    let mut client = Raw::connect(&server, offer).await;
    client.send_compressed(&bomb).await;
    assert_eq!(client.close_code().await, Some(1009));

    // The same in fragments.
    let compressed = compress(bomb.as_bytes());
    let (a, b) = compressed.split_at(compressed.len() / 2);
    let mut client = Raw::connect(&server, offer).await;
    client.send_frame(0x41, a).await;
    client.send_frame(0x80, b).await;
    assert_eq!(client.close_code().await, Some(1009));

    // Data that does not inflate.
    let mut client = Raw::connect(&server, offer).await;
    client.send_frame(0xC1, &[0xFF, 0xFF, 0xFF]).await;
    assert_eq!(client.close_code().await, Some(1007));

    // Compressed bytes that inflate to invalid UTF-8 in a text message.
    let mut client = Raw::connect(&server, offer).await;
    client
        .send_frame(0xC1, &compress(&[0xC3, 0x28, 0xFF]))
        .await;
    assert_eq!(client.close_code().await, Some(1007));

    // RSV1 only on a message's first frame, never on control frames.
    let mut client = Raw::connect(&server, offer).await;
    client.send_frame(0x41, a).await;
    client.send_frame(0xC0, b).await;
    assert_eq!(client.close_code().await, Some(1002));
    let mut client = Raw::connect(&server, offer).await;
    client.send_frame(0xC9, b"").await;
    assert_eq!(client.close_code().await, Some(1002));
}

#[tokio::test]
async fn a_compressed_message_in_fragments_is_put_together_and_read() {
    let server = compressing_server().await;
    let mut client = Raw::connect(&server, Some("permessage-deflate")).await;
    let compressed = compress(subscribe("frag").as_bytes());
    let (a, b) = compressed.split_at(compressed.len() / 2);
    client.send_frame(0x41, a).await;
    // A ping between fragments is answered, as always.
    client.send_frame(0x89, b"p").await;
    client.send_frame(0x80, b).await;
    let (ack, _) = client.message().await;
    assert_eq!(ack["type"], "subscribed");
    assert_eq!(ack["requestId"], "frag");
}
