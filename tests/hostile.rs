//! Hostile input: each bad client gets its documented close code or
//! error, the server never panics, and 100 well-behaved clients connected
//! throughout receive every message, in order.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const GOOD: usize = 100;
fn text(payload: &[u8]) -> Vec<u8> {
    client_frame(0x81, payload, false)
}

/// Opens a raw connection, sends `bytes`, and returns the close code the
/// server sent (skipping data frames), or `None` if it just hung up.
async fn close_code_for(server: &Server, bytes: Vec<u8>) -> Option<u16> {
    let (status, mut stream) = raw_handshake(server.addr, &handshake_request("/ws", "")).await;
    assert_eq!(status, 101);
    // The server may close before everything is written.
    let _ = stream.write_all(&bytes).await;
    read_close(&mut stream).await
}

async fn read_close(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 65536];
        loop {
            // Parse what we have: unmasked server frames.
            let mut at = 0;
            while let Some((header, len)) = server_frame(&buf[at..]) {
                if buf[at] & 0x0F == 0x8 {
                    let payload = &buf[at + header..at + header + len];
                    return (payload.len() >= 2)
                        .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
                at += header + len;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .expect("the server answers in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_their_codes_while_good_clients_get_everything() {
    let server = axum_server(
        builder()
            .max_message_size(64 << 10)
            .message_rate(tower_ws::MessageRate::per_second(1000).burst(2000))
            .subscribe_deadline(Some(Duration::from_secs(5))),
    )
    .await;

    // 100 good clients reading in order throughout.
    let mut good = Vec::new();
    for _ in 0..GOOD {
        let mut client = Client::connect(&server).await;
        client.subscribe("good").await;
        good.push(client);
    }
    subscribers(&server.publisher, "good", GOOD).await;
    let readers: Vec<_> = good
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut next = 1u64;
                while let Some(Ok(message)) = client.ws.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    if support::is_ack(&text) {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if v["text"] == "end" {
                        return next - 1;
                    }
                    assert_eq!(v["seq"].as_u64().unwrap(), next, "in order, none missing");
                    next += 1;
                }
                panic!("a good client lost its connection");
            })
        })
        .collect();
    let publisher = server.publisher.clone();
    let ticking = tokio::spawn(async move {
        let mut sent = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(2)) => {
                    publisher.stream_delta("good", &sent.to_string());
                    sent += 1;
                }
            }
            if sent >= 2000 {
                return sent;
            }
        }
    });

    // Each hostile case and the close code it must get.
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let subscribe_flood: Vec<u8> = (0..10_000)
        .flat_map(|i| text(format!(r#"{{"type":"subscribe","requestId":"f{i}"}}"#).as_bytes()))
        .collect();
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        ("invalid UTF-8", text(&[0xFF, 0xFE, 0xFD]), Some(1007)),
        ("oversized frame", text(&vec![b'a'; 70_000]), Some(1009)),
        (
            "fragments that never end",
            {
                let mut b = client_frame(0x01, &vec![b'a'; 30_000], false);
                for _ in 0..5 {
                    b.extend(client_frame(0x00, &vec![b'a'; 30_000], false));
                }
                b
            },
            Some(1009),
        ),
        (
            "unmasked frame",
            client_frame(0x81, b"hello", true),
            Some(1002),
        ),
        ("reserved bits", client_frame(0xF1, b"x", false), Some(1002)),
        (
            "reserved opcode",
            client_frame(0x83, b"x", false),
            Some(1002),
        ),
        (
            "continuation without a start",
            client_frame(0x80, b"x", false),
            Some(1002),
        ),
        (
            "fragmented ping",
            client_frame(0x09, b"x", false),
            Some(1002),
        ),
        (
            "oversized ping",
            client_frame(0x89, &[0; 126], false),
            Some(1002),
        ),
        (
            "close with a 1-byte payload",
            client_frame(0x88, &[3], false),
            Some(1002),
        ),
        (
            "close with a forbidden code",
            client_frame(0x88, &1005u16.to_be_bytes(), false),
            Some(1002),
        ),
        ("10,000 subscribes", subscribe_flood, Some(1008)),
        (
            "a 2^63-byte frame header",
            {
                let mut b = vec![0x81, 0x80 | 127];
                b.extend_from_slice(&(1u64 << 63).to_be_bytes());
                b.extend_from_slice(&[1, 2, 3, 4]);
                b
            },
            Some(1009),
        ),
        (
            "truncated frame, then gone",
            text(b"hello world")[..6].to_vec(),
            None,
        ),
    ];
    for (name, bytes, expected) in cases {
        eprintln!("case: {name}");
        let truncated = expected.is_none();
        let got = if truncated {
            // Half a frame, then the client hangs up: nothing to answer.
            let (_, mut stream) = raw_handshake(server.addr, &handshake_request("/ws", "")).await;
            stream.write_all(&bytes).await.unwrap();
            drop(stream);
            None
        } else {
            close_code_for(&server, bytes).await
        };
        assert_eq!(got, expected, "{name}");
    }

    // Errors that keep the connection: huge requestId, nesting, binary.
    let mut client = Client::connect(&server).await;
    client.subscribe(&"x".repeat(100_000)[..60_000]).await;
    assert_eq!(client.recv_json().await["error"], "topic_too_long");
    client.send_text(&nested[..60_000]).await;
    assert_eq!(client.recv_json().await["error"], "invalid_message");
    futures_util::SinkExt::send(
        &mut client.ws,
        Message::binary(vec![0xde, 0xad, 0xbe, 0xef]),
    )
    .await
    .unwrap();
    assert_eq!(client.recv_json().await["error"], "invalid_message");

    // A slowloris handshake holds no WebSocket slot: it never upgrades.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    let sent = within(ticking).await.unwrap();
    server.publisher.stream_delta("good", "end");
    for reader in readers {
        assert_eq!(
            within(reader).await.unwrap(),
            sent,
            "every good client got every message"
        );
    }
    assert_eq!(server.publisher.stats().slow_clients_closed, 0);
    drop(slow);
}

#[tokio::test]
async fn registered_close_codes_are_answered_in_kind() {
    let server = axum_server(builder()).await;
    // 1012–1014 are in IANA's registry; 1015 is for local use only.
    for (sent, answer) in [(1012, 1012), (1013, 1013), (1014, 1014), (1015, 1002)] {
        let close = client_frame(0x88, &u16::to_be_bytes(sent), false);
        assert_eq!(close_code_for(&server, close).await, Some(answer), "{sent}");
    }
}

#[tokio::test]
async fn a_frame_sent_with_the_handshake_is_read() {
    // A client that does not wait for the 101: its first frame comes in the
    // same segment as its request, and the server's HTTP parser reads it.
    for server in [axum_server(builder()).await, hyper_server(builder()).await] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let mut bytes = handshake_request("/ws", "").into_bytes();
        bytes.extend(text(br#"{"type":"subscribe","requestId":"early"}"#));
        stream.write_all(&bytes).await.unwrap();
        let mut received = Vec::new();
        let ack = async {
            let mut chunk = [0u8; 4096];
            loop {
                let n = stream.read(&mut chunk).await.unwrap();
                assert_ne!(n, 0, "{}", String::from_utf8_lossy(&received));
                received.extend_from_slice(&chunk[..n]);
                let Some(head) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                if let Some((header, len)) = server_frame(&received[head + 4..]) {
                    let start = head + 4 + header;
                    return String::from_utf8_lossy(&received[start..start + len]).into_owned();
                }
            }
        };
        let ack = within(ack).await;
        assert!(is_ack(&ack), "{ack}");
        stream
            .write_all(&client_frame(0x88, &u16::to_be_bytes(4000), false))
            .await
            .unwrap();
        assert_eq!(read_close(&mut stream).await, Some(4000));
    }
}
