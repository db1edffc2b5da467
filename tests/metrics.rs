//! The `metrics` feature, read back through a Prometheus recorder: the
//! layer's counters appear with bounded labels. Its own test binary: it
//! installs the process's recorder.
#![cfg(feature = "metrics")]

mod support;

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use support::*;

#[tokio::test]
async fn the_layers_counters_are_exported() {
    let metrics = PrometheusBuilder::new().install_recorder().unwrap();
    // A short grace makes the sweeper, which exports, tick every 50 ms.
    let server = axum_server(builder().completed_grace(Duration::from_millis(100))).await;
    let mut client = Client::connect(&server).await;
    client.subscribe("t").await;
    subscribers(&server.publisher, "t", 1).await;
    for word in ["a", "b", "c"] {
        server.publisher.stream_delta("t", word);
    }
    for _ in 0..3 {
        client.recv_json().await;
    }
    assert_eq!(
        Client::connect_with_origin(&server, Some("https://elsewhere.example"))
            .await
            .err(),
        Some(403)
    );
    drop(client);

    let expected = [
        r#"tower_ws_connections{path="/ws"} 0"#,
        r#"tower_ws_connections_opened_total{path="/ws"} 1"#,
        r#"tower_ws_messages_published_total{path="/ws"} 3"#,
        // The three deltas and the `subscribed` acknowledgement.
        r#"tower_ws_messages_delivered_total{path="/ws"} 4"#,
        r#"tower_ws_handshakes_refused_total{path="/ws",reason="origin"} 1"#,
        r#"tower_ws_connections_closed_total{path="/ws",reason="gone"} 1"#,
    ];
    eventually("the counters exported", || {
        let text = metrics.render();
        expected.iter().all(|line| text.lines().any(|l| l == *line))
    })
    .await;
    let text = metrics.render();
    assert!(
        text.contains("# HELP tower_ws_connections connections open (WebSocket and event streams)")
    );
    assert!(!text.contains(r#"topic=""#), "no topic label");
}
