//! WebSockets over HTTP/2 (RFC 8441): hyper's own HTTP/2 client opens
//! extended `CONNECT` streams, several on one connection, against the
//! layer in axum and in a hyper-util server; the checks, limits and close
//! codes are those of HTTP/1.1.

mod support;

use std::time::Duration;

use serde_json::json;
use support::http2::H2;
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower_ws::Principal;

#[tokio::test]
async fn several_websockets_stream_in_order_over_one_http2_connection() {
    within(async {
        let server = axum_server(builder()).await;
        let mut h2 = H2::connect(server.addr).await;
        let mut clients = Vec::new();
        for i in 0..3 {
            let mut client = h2.websocket().await;
            client.subscribe(&format!("t{i}")).await;
            clients.push(client);
        }
        // And one over HTTP/1.1 on the first topic: nothing else differs.
        let mut http1 = Client::connect(&server).await;
        http1.subscribe("t0").await;
        for i in 0..3 {
            let expected = if i == 0 { 2 } else { 1 };
            subscribers(&server.publisher, &format!("t{i}"), expected).await;
        }
        assert_eq!(server.publisher.stats().connections, 4);

        for n in 1..=100u64 {
            for i in 0..3 {
                server
                    .publisher
                    .stream_delta(&format!("t{i}"), &format!("word{n} "));
            }
        }
        for client in &mut clients {
            for seq in 1..=100u64 {
                let m = client.recv_json().await;
                assert_eq!(m["seq"], seq, "in order: {m}");
            }
        }
        for seq in 1..=100u64 {
            assert_eq!(http1.recv_json().await["seq"], seq);
        }
        // A client message on a stream is handled as on any connection.
        clients[1].send_json(json!({"type": "ping"})).await;
        assert_eq!(clients[1].recv_json().await["type"], "pong");
    })
    .await;
}

#[tokio::test]
async fn http2_handshakes_pass_the_same_checks() {
    within(async {
        let server = hyper_server(
            builder()
                .allowed_origins(["https://app.example"])
                .max_connections_per_ip(2)
                .authorize(|req| {
                    let principal = Principal::new("alice");
                    Ok(match req.protocols().any(|p| p == "bearer") {
                        true => principal.with_protocol("bearer"),
                        false => principal,
                    })
                }),
        )
        .await;
        let mut h2 = H2::connect(server.addr).await;
        // Origin, version: refused as on HTTP/1.1.
        let refused = h2.open(&[("origin", "https://evil.example")]).await;
        assert_eq!(refused.err().map(|s| s.as_u16()), Some(403));
        let old = h2.open(&[("sec-websocket-version", "8")]).await;
        assert_eq!(old.err().map(|s| s.as_u16()), Some(426));
        // The principal's subprotocol is echoed.
        let (_first, headers) = h2
            .open(&[
                ("origin", "https://app.example"),
                ("sec-websocket-protocol", "json, bearer"),
            ])
            .await
            .expect("accepted");
        assert_eq!(headers["sec-websocket-protocol"], "bearer");
        // Streams count against the per-address limit like connections.
        let _second = h2.websocket().await;
        let third = h2.open(&[]).await;
        assert_eq!(third.err().map(|s| s.as_u16()), Some(503));
        assert_eq!(server.publisher.stats().connections, 2);
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_http2_websockets_with_1001() {
    within(async {
        let server = axum_server(builder()).await;
        let mut h2 = H2::connect(server.addr).await;
        let (mut a, mut b) = (h2.websocket().await, h2.websocket().await);
        a.subscribe("req-1").await;
        b.subscribe("req-1").await;
        subscribers(&server.publisher, "req-1", 2).await;
        server.publisher.status("req-1", "searching");
        let publisher = server.publisher.clone();
        let summary =
            tokio::spawn(async move { publisher.shutdown(Duration::from_secs(10)).await });
        for client in [&mut a, &mut b] {
            assert_eq!(client.recv_json().await["type"], "status");
            assert_eq!(client.recv_close().await, Some(CloseCode::Away));
        }
        assert_eq!(summary.await.unwrap().connections, 2);
    })
    .await;
}
