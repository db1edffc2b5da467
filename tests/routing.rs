//! Routing, the handshake's HTTP answers, and the Origin policy, on both an
//! axum stack and a plain hyper-util + tower-http stack.

mod support;

use support::*;

async fn both(builder_fn: fn() -> tower_ws::WsLayerBuilder) -> [Server; 2] {
    [
        axum_server(builder_fn()).await,
        hyper_server(builder_fn()).await,
    ]
}

#[tokio::test]
async fn other_paths_reach_the_inner_service() {
    for server in both(builder).await {
        for path in ["/hello", "/wsx", "/ws/x", "/"] {
            let (status, text) = raw_http(
                server.addr,
                &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert!(
                text.contains("hello from") || status == 404,
                "{path}: {text}"
            );
            assert_ne!(status, 426, "{path}");
        }
        // Even a handshake on another path is not ours.
        let (status, _) = raw_http(
            server.addr,
            &handshake_request("/ws/x", "Connection-Close: 1\r\n"),
        )
        .await;
        assert_ne!(status, 101);
    }
}

#[tokio::test]
async fn plain_requests_to_the_path_get_426() {
    for server in both(builder).await {
        let (status, text) = raw_http(
            server.addr,
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 426, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("upgrade: websocket"),
            "{text}"
        );
        assert!(text.contains("accepts WebSocket connections"), "{text}");

        // A POST is a client message for an event stream, which it names.
        let post = "POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(raw_http(server.addr, post).await.0, 400);
        let put = "PUT /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(raw_http(server.addr, put).await.0, 426);
    }
}

#[tokio::test]
async fn bad_handshakes_are_refused() {
    let server = axum_server(builder()).await;
    let old = handshake_request("/ws", "").replace("Version: 13", "Version: 8");
    let (status, text) = raw_http(server.addr, &old).await;
    assert_eq!(status, 426);
    assert!(
        text.contains("Sec-WebSocket-Version: 13") || text.contains("sec-websocket-version: 13"),
        "{text}"
    );
    let keyless =
        handshake_request("/ws", "").replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    assert_eq!(raw_http(server.addr, &keyless).await.0, 400);
}

#[tokio::test]
async fn websocket_works_on_both_stacks() {
    for server in both(builder).await {
        let mut client = Client::connect(&server).await;
        client.subscribe("t").await;
        subscribers(&server.publisher, "t", 1).await;
        server.publisher.stream_delta("t", "hi");
        assert_eq!(client.recv_json().await["text"], "hi");
    }
}

#[tokio::test]
async fn origin_absent_is_accepted() {
    let server = hyper_server(builder().allowed_origins(["https://app.example.com"])).await;
    assert!(Client::connect_with_origin(&server, None).await.is_ok());
}

#[tokio::test]
async fn origin_on_the_allowlist_is_accepted() {
    let server = axum_server(builder().allowed_origins(["https://app.example.com"])).await;
    assert!(
        Client::connect_with_origin(&server, Some("https://APP.example.com"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn origin_elsewhere_is_rejected_with_403() {
    for server in both(|| builder().allowed_origins(["https://app.example.com"])).await {
        assert_eq!(
            Client::connect_with_origin(&server, Some("https://evil.example"))
                .await
                .err(),
            Some(403)
        );
        assert_eq!(
            Client::connect_with_origin(&server, Some("null"))
                .await
                .err(),
            Some(403)
        );
        assert_eq!(server.publisher.stats().connections, 0);
    }
}

#[tokio::test]
async fn same_origin_is_accepted() {
    let server = axum_server(builder()).await;
    // tungstenite sends Host: 127.0.0.1:<port>.
    let same = format!("http://{}", server.addr);
    assert!(Client::connect_with_origin(&server, Some(&same))
        .await
        .is_ok());
    let other_port = format!("http://127.0.0.1:{}", server.addr.port() + 1);
    assert_eq!(
        Client::connect_with_origin(&server, Some(&other_port))
            .await
            .err(),
        Some(403)
    );
}

#[tokio::test]
async fn any_origin_only_when_opted_in() {
    let server = axum_server(builder().allow_any_origin()).await;
    assert!(
        Client::connect_with_origin(&server, Some("https://anywhere.example"))
            .await
            .is_ok()
    );
}
