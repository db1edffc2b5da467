//! Authorization: the handshake hook (principal or 401/403, a token in
//! `Sec-WebSocket-Protocol`) and the subscribe hook (`forbidden`).

mod support;

use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tower_ws::{Principal, Rejection, WsLayerBuilder};

/// Accepts `?token=alice-token` or a `bearer, <token>` subprotocol pair;
/// alice may read only topics starting with "alice-".
fn with_auth() -> WsLayerBuilder {
    builder()
        .authorize(|req| {
            let from_query = req.uri().query().and_then(|q| q.strip_prefix("token="));
            let mut protocols = req.protocols();
            let from_protocol = match (protocols.next(), protocols.next()) {
                (Some("bearer"), Some(token)) => Some(token),
                _ => None,
            };
            match from_query.or(from_protocol) {
                None => Err(Rejection::unauthorized("no token")),
                Some("alice-token") => {
                    let principal = Principal::new("alice").with_data(vec!["alice-".to_owned()]);
                    Ok(match from_protocol {
                        Some(_) => principal.with_protocol("bearer"),
                        None => principal,
                    })
                }
                Some(_) => Err(Rejection::forbidden("unknown token")),
            }
        })
        .authorize_subscribe(|principal, topic| {
            principal
                .and_then(|p| p.data::<Vec<String>>())
                .is_some_and(|prefixes| prefixes.iter().any(|p| topic.starts_with(p.as_str())))
        })
}

async fn connect(server: &Server, query: &str, protocols: Option<&str>) -> Result<Client, u16> {
    let mut request = format!("{}{query}", server.ws_url())
        .into_client_request()
        .unwrap();
    if let Some(protocols) = protocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => {
            if protocols.is_some() {
                assert_eq!(response.headers()["sec-websocket-protocol"], "bearer");
            }
            Ok(Client {
                ws,
                keep_acks: false,
            })
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn the_handshake_hook_admits_or_refuses_before_the_upgrade() {
    let server = axum_server(with_auth()).await;
    assert_eq!(connect(&server, "", None).await.err(), Some(401));
    assert_eq!(
        connect(&server, "?token=mallory", None).await.err(),
        Some(403)
    );
    assert!(connect(&server, "?token=alice-token", None).await.is_ok());
    assert_eq!(server.publisher.stats().connections, 1);
}

#[tokio::test]
async fn a_token_in_the_subprotocol_header_works_and_is_echoed() {
    let server = axum_server(with_auth()).await;
    assert!(connect(&server, "", Some("bearer, alice-token"))
        .await
        .is_ok());
    assert_eq!(
        connect(&server, "", Some("bearer, wrong")).await.err(),
        Some(403)
    );
}

#[tokio::test]
async fn a_forbidden_subscribe_gets_an_error_and_no_data() {
    let server = axum_server(with_auth()).await;
    let mut alice = connect(&server, "?token=alice-token", None).await.unwrap();
    server.publisher.stream_delta("bob-1", "secret");
    alice.subscribe("bob-1").await;
    let error = alice.recv_json().await;
    assert_eq!(
        (error["error"].as_str(), error["requestId"].as_str()),
        (Some("forbidden"), Some("bob-1"))
    );
    assert_eq!(server.publisher.subscriber_count("bob-1"), 0);
    alice.subscribe("alice-1").await;
    subscribers(&server.publisher, "alice-1", 1).await;
    server.publisher.stream_delta("alice-1", "mine");
    assert_eq!(alice.recv_json().await["text"], "mine");
}

/// `?user=<name>` names the principal.
fn by_user() -> WsLayerBuilder {
    builder().authorize(
        |req| match req.uri().query().and_then(|q| q.strip_prefix("user=")) {
            Some(user) => Ok(Principal::new(user)),
            None => Err(Rejection::unauthorized("no user")),
        },
    )
}

#[tokio::test]
async fn the_application_knows_who_connects_and_can_reach_and_close_them() {
    let server = axum_server(
        by_user()
            .connection_events(true)
            .on_message(|inbound, reply| match inbound {
                tower_ws::Inbound::Text("whoami") => {
                    reply.text(reply.principal().map_or("?", Principal::id));
                    tower_ws::Handled::Yes
                }
                _ => tower_ws::Handled::No,
            }),
    )
    .await;
    let mut events = server.publisher.take_client_events().unwrap();
    let mut tab1 = connect(&server, "?user=ann", None).await.unwrap();
    let mut tab2 = connect(&server, "?user=ann", None).await.unwrap();
    let mut other = connect(&server, "?user=bob", None).await.unwrap();

    let mut connected = Vec::new();
    for _ in 0..3 {
        let event = within(events.recv()).await.unwrap();
        assert_eq!(event.kind, tower_ws::ClientEventKind::Connected);
        connected.push((event.client_id, event.principal.unwrap().id().to_owned()));
    }
    let ann: Vec<_> = connected.iter().filter(|(_, p)| p == "ann").collect();
    assert_eq!(ann.len(), 2);

    // The hook sees the principal too.
    tab1.send_text("whoami").await;
    assert_eq!(tab1.recv_text().await, "ann");

    // A user's tabs, and only theirs.
    let sent = server
        .publisher
        .send_to_principal("ann", &serde_json::json!({"type": "notice"}))
        .unwrap();
    assert_eq!(sent, 2);
    assert_eq!(tab1.recv_json().await["type"], "notice");
    assert_eq!(tab2.recv_json().await["type"], "notice");

    // Events carry the principal.
    tab2.send_json(serde_json::json!({"type":"action_clicked","requestId":"r","actionId":"a"}))
        .await;
    let clicked = within(events.recv()).await.unwrap();
    assert_eq!(clicked.principal.unwrap().id(), "ann");

    // The server closes one client.
    let bob = connected.iter().find(|(_, p)| p == "bob").unwrap().0;
    assert!(!server.publisher.close_client(bob, 1005, "reserved code"));
    assert!(server
        .publisher
        .close_client(bob, 4001, "account suspended"));
    assert_eq!(
        other.recv_close().await,
        Some(tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::from(4001))
    );
    drop(other);
    let gone = within(events.recv()).await.unwrap();
    assert_eq!(
        (gone.client_id, gone.kind),
        (bob, tower_ws::ClientEventKind::Disconnected)
    );
    assert!(!server.publisher.close_client(bob, 1000, "again"));
}

#[derive(Clone)]
struct Session(String);

#[tokio::test]
async fn an_async_hook_sees_what_middleware_put_in_the_request_and_may_wait() {
    use axum::extract::Request;
    use tower::util::MapRequestLayer;

    // A session store that answers for "slow" only when the test says so.
    let store = std::sync::Arc::new(tokio::sync::Notify::new());
    let answer = store.clone();
    let (layer, publisher) = builder()
        .authorize_async(move |req| {
            let session = req.extensions().get::<Session>().cloned();
            let store = store.clone();
            async move {
                let Some(Session(id)) = session else {
                    return Err(Rejection::unauthorized("no session"));
                };
                if id == "slow" {
                    store.notified().await;
                }
                tokio::task::yield_now().await;
                match id.as_str() {
                    "s1" | "slow" => Ok(Principal::new(format!("user-of-{id}"))),
                    _ => Err(Rejection::forbidden("unknown session")),
                }
            }
        })
        .connection_events(true)
        .build()
        .unwrap();
    // A session layer in front of the WebSocket layer.
    let app = axum::Router::new()
        .layer(layer)
        .layer(MapRequestLayer::new(|mut req: Request| {
            let session = req
                .headers()
                .get("x-session")
                .map(|v| v.to_str().unwrap().to_owned());
            if let Some(id) = session {
                req.extensions_mut().insert(Session(id));
            }
            req
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut events = publisher.take_client_events().unwrap();

    let slow = tokio::spawn(async move {
        raw_handshake(addr, &handshake_request("/ws", "X-Session: slow\r\n")).await
    });
    let started = tokio::time::Instant::now();
    let (status, _s1) = raw_handshake(addr, &handshake_request("/ws", "X-Session: s1\r\n")).await;
    assert_eq!(status, 101);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "not behind the slow one"
    );
    let connected = within(events.recv()).await.unwrap();
    assert_eq!(connected.principal.unwrap().id(), "user-of-s1");

    assert_eq!(
        raw_handshake(addr, &handshake_request("/ws", "")).await.0,
        401
    );
    let (status, _) = raw_handshake(addr, &handshake_request("/ws", "X-Session: other\r\n")).await;
    assert_eq!(status, 403);
    assert!(!slow.is_finished());
    answer.notify_one();
    assert_eq!(within(slow).await.unwrap().0, 101);
}
