//! Behind TLS (tokio-rustls): a writer whose flush cannot finish, because
//! the client stopped reading, still stops at shutdown's deadline.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use support::*;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, crypto::ring};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceBuilder;
use tower_ws::Publisher;

const CA: &[u8] = include_bytes!("support/tls/ca.pem");
const CERT: &[u8] = include_bytes!("support/tls/cert.pem");
const KEY: &[u8] = include_bytes!("support/tls/key.pem");

/// A hyper server behind TLS whose sockets have small send buffers.
async fn tls_server(builder: tower_ws::WsLayerBuilder) -> (SocketAddr, Publisher) {
    let certs = CertificateDer::pem_slice_iter(CERT)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(KEY).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (layer, publisher) = builder.build().unwrap();
    let service =
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello"))))
            });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            socket2::SockRef::from(&tcp)
                .set_send_buffer_size(4096)
                .unwrap();
            let (acceptor, service) = (acceptor.clone(), service.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(tls),
                        TowerToHyperService::new(service),
                    )
                    .await;
            });
        }
    });
    (addr, publisher)
}

#[tokio::test]
async fn a_writer_stuck_flushing_tls_still_stops_at_shutdown() {
    let (addr, publisher) = tls_server(builder()).await;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(CA) {
        roots.add(ca.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://localhost/ws", tls)
        .await
        .unwrap();
    ws.send(Message::text(r#"{"type":"subscribe","requestId":"t"}"#))
        .await
        .unwrap();
    subscribers(&publisher, "t", 1).await;

    // The client reads no more. What is published fits the TLS session's
    // buffer, so every write succeeds and the writer is left flushing.
    let text = "x".repeat(1000);
    for _ in 0..40 {
        publisher.stream_delta("t", &text);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let summary = within(publisher.shutdown(Duration::from_millis(300))).await;
    assert_eq!((summary.connections, summary.terminated), (1, 1));
    eventually("the connection's task ended", || {
        publisher.stats().connections == 0
    })
    .await;
    drop(ws);
}
