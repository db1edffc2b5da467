//! Headless Chromium opens its WebSockets over HTTP/2 (RFC 8441) when the
//! server offers `h2` behind TLS and allows extended `CONNECT`: a page
//! streams two narrations at once, over two streams of its connection.
//! The page posts what it shows to `/result`.
//!
//! Needs Debian's Chromium, so `cargo test` leaves it out (ignored);
//! `tests/clients/run` installs Chromium and runs it with `--ignored`.
//! The certificate is the test CA's (`tests/support/tls/`), which Chromium
//! is told to accept (`--ignore-certificate-errors`).
#![cfg(not(windows))]

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use support::*;
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, crypto::ring};
use tokio_rustls::TlsAcceptor;
use tower::{ServiceBuilder, ServiceExt};

const CERT: &[u8] = include_bytes!("support/tls/cert.pem");
const KEY: &[u8] = include_bytes!("support/tls/key.pem");

/// Two WebSockets, each subscribed to its own narration; the page posts
/// both texts once both are done.
const PAGE: &str = r#"<!doctype html><html><body><pre id="out">waiting</pre><script>
const texts = {};
let done = 0;
for (const topic of ["one", "two"]) {
  texts[topic] = "";
  const ws = new WebSocket("wss://" + location.host + "/ws");
  ws.onopen = () => ws.send(JSON.stringify({type: "subscribe", requestId: topic}));
  ws.onmessage = (event) => {
    const m = JSON.parse(event.data);
    if (m.type === "stream.delta") texts[topic] += m.text;
    if (m.type === "stream.done" && ++done === 2) {
      fetch("/result", {method: "POST", body: "one=" + texts.one + "|two=" + texts.two});
    }
  };
  ws.onerror = () => fetch("/result", {method: "POST", body: "error " + topic});
}
</script></body></html>"#;

#[tokio::test]
#[ignore = "needs Chromium; tests/clients/run runs it"]
async fn chromium_streams_two_narrations_over_one_http2_connection() {
    within(async {
        let certs = CertificateDer::pem_slice_iter(CERT)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(KEY).unwrap();
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (layer, publisher) = builder().build().unwrap();
        let (result_tx, result_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let service = ServiceBuilder::new().layer(layer).service_fn(
            move |req: Request<hyper::body::Incoming>| {
                let result_tx = result_tx.clone();
                async move {
                    if req.uri().path() == "/result" {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = result_tx.send(String::from_utf8_lossy(&body).into_owned());
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(PAGE))))
                }
            },
        );
        // How each WebSocket handshake came: (HTTP version, method).
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                let service =
                    service
                        .clone()
                        .map_request(move |req: Request<hyper::body::Incoming>| {
                            if req.uri().path() == "/ws" {
                                seen.lock()
                                    .unwrap()
                                    .push((req.version(), req.method().clone()));
                            }
                            req
                        });
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut server =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    server.http2().enable_connect_protocol();
                    let _ = server
                        .serve_connection_with_upgrades(
                            TokioIo::new(tls),
                            TowerToHyperService::new(service),
                        )
                        .await;
                });
            }
        });

        let profile = std::env::temp_dir().join(format!("tower-ws-chromium-{port}"));
        let chromium = tokio::process::Command::new(
            std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned()),
        )
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
        ])
        .args(["--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync"])
        .arg("--ignore-certificate-errors")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("https://localhost:{port}/"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium on PATH (apt-get install chromium), or CHROMIUM");

        // Stream both narrations once the page has subscribed to both.
        subscribers(&publisher, "one", 1).await;
        subscribers(&publisher, "two", 1).await;
        let words = ["Streaming ", "over ", "one ", "HTTP/2 ", "connection."];
        for word in words {
            publisher.stream_delta("one", word);
            publisher.stream_delta("two", &word.to_uppercase());
        }
        publisher.stream_done("one", &words.concat());
        publisher.stream_done("two", &words.concat().to_uppercase());

        let mut result_rx = result_rx;
        let shown = result_rx.recv().await.unwrap();
        drop(chromium);
        let _ = std::fs::remove_dir_all(&profile);
        let text = words.concat();
        assert_eq!(shown, format!("one={text}|two={}", text.to_uppercase()));
        let handshakes = handshakes.lock().unwrap().clone();
        assert_eq!(
            handshakes,
            [
                (Version::HTTP_2, Method::CONNECT),
                (Version::HTTP_2, Method::CONNECT)
            ],
            "both WebSockets as HTTP/2 streams"
        );
    })
    .await;
}
