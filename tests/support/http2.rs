//! WebSockets over HTTP/2 (RFC 8441) from hyper's own HTTP/2 client:
//! several extended `CONNECT` streams on one connection, each a WebSocket
//! driven by tokio-tungstenite.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::Client;

/// A WebSocket on one HTTP/2 stream.
pub type H2Client = Client<TokioIo<hyper::upgrade::Upgraded>>;

/// One HTTP/2 connection (prior knowledge, no TLS).
pub struct H2 {
    addr: SocketAddr,
    send: SendRequest<Empty<Bytes>>,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> H2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(connection);
        H2 { addr, send }
    }

    /// Opens a WebSocket on a new stream of this connection.
    pub async fn websocket(&mut self) -> H2Client {
        self.open(&[]).await.expect("handshake accepted").0
    }

    /// Opens a WebSocket on a new stream of this connection with extra
    /// request headers; the response's headers, or its status if the
    /// server refused.
    pub async fn open(
        &mut self,
        headers: &[(&str, &str)],
    ) -> Result<(H2Client, HeaderMap), StatusCode> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://{}/ws", self.addr));
        if !headers
            .iter()
            .any(|(name, _)| *name == "sec-websocket-version")
        {
            request = request.header("sec-websocket-version", "13");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(Empty::new()).unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        self.send.ready().await.unwrap();
        let response = self.send.send_request(request).await.unwrap();
        if response.status() != StatusCode::OK {
            return Err(response.status());
        }
        let headers = response.headers().clone();
        let upgraded = hyper::upgrade::on(response).await.unwrap();
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        Ok((Client::over(ws), headers))
    }
}
