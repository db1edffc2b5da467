//! The [`WsService`]: routing, the `Origin` check and the handshake.
//!
//! A request to the configured path is answered by the layer itself:
//!
//! | request | response |
//! |---|---|
//! | a WebSocket handshake that passes every check | `101 Switching Protocols`; the connection is served in a task of its own |
//! | the same over HTTP/2: an extended `CONNECT` (RFC 8441) with `Sec-WebSocket-Version: 13` | `200 OK`; the stream is served as a connection of its own |
//! | `GET` with `Accept: text/event-stream` and a `requestId` | `200` and an event stream (see [`crate::sse`]) |
//! | `POST` with a `clientId`: a client message for an event stream | `202 Accepted` (see [`crate::sse`]) |
//! | `requestId`, `since` or `clientId` missing or malformed | `400 Bad Request` |
//! | anything else (not `GET`, no `Connection: upgrade` or `Upgrade: websocket`) | `426 Upgrade Required` |
//! | `Sec-WebSocket-Version` other than 13 | `426 Upgrade Required` with `Sec-WebSocket-Version: 13` |
//! | no `Sec-WebSocket-Key` | `400 Bad Request` |
//! | after shutdown began, or at the connection limit | `503 Service Unavailable` with `Retry-After` |
//! | an `Origin` the policy refuses | `403 Forbidden` |
//! | a [`Rejection`](crate::Rejection) from the `authorize` hook | `401 Unauthorized` or `403 Forbidden` |
//!
//! Every other request goes to the inner service untouched.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use pin_project_lite::pin_project;
use tower::Service;

use crate::auth::{header_tokens, Authorize, Principal, Rejection, UpgradeRequest};
use crate::body::{LayerBody, WsBody};
use crate::client_ip::{client_ip, IpSlot};
use crate::connection::{self, Peer, Seen};
use crate::frame::deflate;
use crate::shared::Shared;
use crate::shutdown::TaskGuard;
use crate::sse::{self, StreamId, Subscription};
use crate::stats::Refused;

/// The service a [`WsLayer`](crate::WsLayer) makes around an inner service.
pub struct WsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> WsService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service; the layer's connections and publishers go on.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for WsService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for WsService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsService")
            .field("inner", &self.inner)
            .field("path", &self.shared.config.path)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for WsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
{
    type Response = Response<WsBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if req.uri().path() != self.shared.config.path {
            return ResponseFuture {
                kind: Kind::Inner {
                    future: self.inner.call(req),
                },
            };
        }
        let kind = match admission(&self.shared, req) {
            Admission::Answered(response) => Kind::Ready {
                response: Some(response.map(WsBody::own)),
            },
            Admission::Pending(future) => Kind::Pending { future },
        };
        ResponseFuture { kind }
    }
}

pin_project! {
    /// The future of a [`WsService`]'s response.
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner { #[pin] future: F },
        Ready { response: Option<Response<WsBody<B>>> },
        Pending { future: Pin<Box<dyn Future<Output = Response<LayerBody>> + Send>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<WsBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx).map_ok(|r| r.map(WsBody::inner)),
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Pending { future } => {
                future.as_mut().poll(cx).map(|r| Ok(r.map(WsBody::own)))
            }
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// The answer to a request on the layer's path: now, or once an async
/// `authorize` hook has decided (or a posted message was read).
enum Admission {
    Answered(Response<LayerBody>),
    Pending(Pin<Box<dyn Future<Output = Response<LayerBody>> + Send>>),
}

/// What admission learned of the client before authorizing it.
pub(crate) struct Client {
    pub(crate) ip: Option<IpAddr>,
    pub(crate) origin: Option<String>,
}

/// What the request asks for.
enum Transport {
    WebSocket,
    EventStream(Subscription),
    Post(StreamId),
}

/// Sorts a request out by what it asks for, refusing one that is none of
/// them.
fn transport<B>(shared: &Shared, req: &Request<B>) -> Result<Transport, Refusal> {
    let headers = req.headers();
    let upgrade = req.method() == Method::GET
        && req.version() >= Version::HTTP_11
        && has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket");
    // An HTTP/2 extended CONNECT (RFC 8441): a CONNECT with a path, which a
    // plain CONNECT never has. Its `:protocol` is readable only through
    // hyper's `http2` feature; `Sec-WebSocket-Version` is sent only by
    // WebSocket clients, and its handshake has no key.
    let connect = req.method() == Method::CONNECT && req.version() == Version::HTTP_2;
    if upgrade || connect {
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return Err(Refusal(
                Refused::NotWebSocket,
                StatusCode::UPGRADE_REQUIRED,
                "unsupported WebSocket version; use 13\n",
            ));
        }
        if upgrade && !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
            return Err(Refusal(
                Refused::NotWebSocket,
                StatusCode::BAD_REQUEST,
                "missing Sec-WebSocket-Key\n",
            ));
        }
        return Ok(Transport::WebSocket);
    }
    if shared.config.event_streams {
        if req.method() == Method::GET && has_token(headers, header::ACCEPT, "text/event-stream") {
            return sse::subscription(req.uri(), headers, &shared.config.limits)
                .map(Transport::EventStream)
                .map_err(|why| Refusal(Refused::BadRequest, StatusCode::BAD_REQUEST, why));
        }
        if req.method() == Method::POST {
            return sse::posted_to(req.uri())
                .map(Transport::Post)
                .map_err(|why| Refusal(Refused::BadRequest, StatusCode::BAD_REQUEST, why));
        }
    }
    Err(Refusal(
        Refused::NotWebSocket,
        StatusCode::UPGRADE_REQUIRED,
        if shared.config.event_streams {
            "this endpoint accepts WebSocket connections and event streams (Accept: text/event-stream)\n"
        } else {
            "this endpoint only accepts WebSocket connections\n"
        },
    ))
}

fn admission<B>(shared: &Arc<Shared>, req: Request<B>) -> Admission
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    let transport = match transport(shared, &req) {
        Ok(transport) => transport,
        Err(refusal) => return Admission::Answered(refusal.answer(shared)),
    };
    if !shared.hub.is_accepting() {
        return Admission::Answered(shutting_down(shared));
    }
    let headers = req.headers();
    let ip = client_ip(
        headers,
        req.extensions(),
        shared.config.trusted_proxy_header.as_ref(),
    );
    let origin = text(headers, header::ORIGIN);
    let host = text(headers, header::HOST).or_else(|| req.uri().authority().map(|a| a.to_string()));
    if !shared
        .config
        .origins
        .allows(origin.as_deref(), host.as_deref())
    {
        tracing::warn!(
            origin = ?origin.as_deref(),
            host = ?host.as_deref(),
            ip = ?ip,
            "websocket_origin_rejected"
        );
        return Admission::Answered(reject(
            shared,
            Refused::Origin,
            StatusCode::FORBIDDEN,
            "origin not allowed\n",
        ));
    }
    let client = Client { ip, origin };
    let request = UpgradeRequest {
        uri: req.uri(),
        headers: req.headers(),
        extensions: req.extensions(),
        peer: req.extensions().get::<SocketAddr>().copied(),
    };
    match &shared.config.auth.authorize {
        None => proceed(shared, req, client, None, transport),
        Some(Authorize::Now(authorize)) => match authorize(&request) {
            Ok(principal) => proceed(shared, req, client, Some(principal), transport),
            Err(rejection) => Admission::Answered(unauthorized(shared, &rejection, &client)),
        },
        Some(Authorize::Later(authorize)) => {
            let decision = authorize(&request);
            let shared = shared.clone();
            Admission::Pending(Box::pin(async move {
                match decision.await {
                    Ok(principal) => {
                        match proceed(&shared, req, client, Some(principal), transport) {
                            Admission::Answered(response) => response,
                            Admission::Pending(future) => future.await,
                        }
                    }
                    Err(rejection) => unauthorized(&shared, &rejection, &client),
                }
            }))
        }
    }
}

/// Goes on with an authorized request.
fn proceed<B>(
    shared: &Arc<Shared>,
    req: Request<B>,
    client: Client,
    principal: Option<Principal>,
    transport: Transport,
) -> Admission
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    match transport {
        Transport::WebSocket => Admission::Answered(admit(shared, req, client, principal)),
        Transport::EventStream(subscription) => Admission::Answered(sse::open(
            shared,
            req.headers(),
            client,
            principal,
            subscription,
        )),
        Transport::Post(stream) => Admission::Pending(Box::pin(sse::post(
            shared.clone(),
            req.into_body(),
            principal,
            stream,
        ))),
    }
}

fn unauthorized(shared: &Shared, rejection: &Rejection, client: &Client) -> Response<LayerBody> {
    tracing::warn!(
        status = rejection.status,
        reason = ?rejection.reason,
        origin = ?client.origin.as_deref(),
        ip = ?client.ip,
        "websocket_unauthorized"
    );
    match rejection.status {
        401 => reject(
            shared,
            Refused::Unauthorized,
            StatusCode::UNAUTHORIZED,
            "unauthorized\n",
        ),
        _ => reject(
            shared,
            Refused::Unauthorized,
            StatusCode::FORBIDDEN,
            "forbidden\n",
        ),
    }
}

/// Admits an authorized WebSocket client: limits, upgrade, and its
/// connection task.
fn admit<B>(
    shared: &Arc<Shared>,
    mut req: Request<B>,
    client: Client,
    principal: Option<Principal>,
) -> Response<LayerBody> {
    if let Some(protocol) = principal.as_ref().and_then(Principal::protocol) {
        if !header_tokens(req.headers(), header::SEC_WEBSOCKET_PROTOCOL).any(|p| p == protocol) {
            tracing::error!(
                protocol,
                "websocket_unauthorized: the principal's protocol was not offered"
            );
            return reject(
                shared,
                Refused::Misconfigured,
                StatusCode::INTERNAL_SERVER_ERROR,
                "server misconfigured\n",
            );
        }
    }
    let slots = match take_slots(shared, req.headers(), client.ip) {
        Ok(slots) => slots,
        Err(refusal) => return refusal.answer(shared),
    };
    let protocol = principal
        .as_ref()
        .and_then(|p| p.protocol())
        .map(str::to_owned);
    let Client { ip, origin } = client;
    let deflate = shared
        .config
        .compression
        .and_then(|settings| deflate::negotiate(req.headers(), settings));
    let peer = Peer {
        principal: principal.map(Box::new),
        deflate: deflate.as_ref().map(|(deflate, _)| *deflate),
        seen: Box::new(Seen {
            origin,
            user_agent: text(req.headers(), header::USER_AGENT),
            ip,
        }),
    };
    // hyper's upgrade is taken for both versions: on HTTP/1.1 it is what
    // fastwebsockets' handshake would await, and one type keeps the
    // connection's task smaller.
    let upgrade = hyper::upgrade::on(&mut req);
    let mut response = if req.method() == Method::CONNECT {
        Response::new(LayerBody::from(Bytes::new()))
    } else {
        match fastwebsockets::upgrade::upgrade(&mut req) {
            Ok((response, _)) => response.map(|_| LayerBody::from(Bytes::new())),
            Err(_) => {
                return reject(
                    shared,
                    Refused::NotWebSocket,
                    StatusCode::BAD_REQUEST,
                    "invalid WebSocket handshake\n",
                )
            }
        }
    };
    tokio::spawn(connection::serve(shared.clone(), upgrade, peer, slots));
    if let Some(value) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    if let Some((_, extensions)) = deflate {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, extensions);
    }
    response
}

/// Takes a place for a new connection under the global and per-address
/// limits, and starts the sweeper with the first one.
pub(crate) fn take_slots(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    ip: Option<IpAddr>,
) -> Result<(TaskGuard, Option<IpSlot>), Refusal> {
    if tokio::runtime::Handle::try_current().is_err() {
        tracing::error!("websocket_upgrade_failed: the layer must run inside a Tokio runtime");
        return Err(Refusal(
            Refused::Misconfigured,
            StatusCode::INTERNAL_SERVER_ERROR,
            "server misconfigured\n",
        ));
    }
    // An async hook may have taken a while.
    if !shared.hub.is_accepting() {
        return Err(SHUTTING_DOWN);
    }
    let max_connections = shared.config.limits.max_connections;
    // Room for this one comes first from connections that never subscribed.
    let headroom = (max_connections / 10).max(1);
    let live = shared.tasks.live();
    if live + headroom >= max_connections {
        shared.hub.shed_idle(live + headroom + 1 - max_connections);
    }
    let Some(task) = shared.tasks.try_start(max_connections) else {
        tracing::warn!(max_connections, ip = ?ip, "websocket_connection_limit_reached");
        return Err(Refusal(
            Refused::ConnectionLimit,
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections\n",
        ));
    };
    let max_per_ip = shared.config.limits.max_connections_per_ip;
    let ip_slot = match ip {
        None => None,
        Some(ip) => match shared.per_ip.try_take(ip, max_per_ip) {
            Some((slot, held)) => {
                if shared.config.trusted_proxy_header.is_none() {
                    shared.per_ip.warn_if_proxied(headers, ip, held, max_per_ip);
                }
                Some(slot)
            }
            None => {
                tracing::warn!(max_per_ip, %ip, "websocket_connection_limit_reached");
                return Err(Refusal(
                    Refused::AddressLimit,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many connections from your address\n",
                ));
            }
        },
    };
    shared.ensure_background_tasks();
    Ok((task, ip_slot))
}

pub(crate) fn shutting_down(shared: &Shared) -> Response<LayerBody> {
    SHUTTING_DOWN.answer(shared)
}

/// A refusal not yet answered: why, the status, and the text.
pub(crate) struct Refusal(Refused, StatusCode, &'static str);

const SHUTTING_DOWN: Refusal = Refusal(
    Refused::ShuttingDown,
    StatusCode::SERVICE_UNAVAILABLE,
    "server is shutting down\n",
);

impl Refusal {
    pub(crate) fn answer(self, shared: &Shared) -> Response<LayerBody> {
        reject(shared, self.0, self.1, self.2)
    }
}

/// A refusal, counted by its reason.
pub(crate) fn reject(
    shared: &Shared,
    why: Refused,
    status: StatusCode,
    body: &'static str,
) -> Response<LayerBody> {
    shared.hub.counters.refused(why);
    let mut response = Response::new(LayerBody::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::UPGRADE_REQUIRED {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

/// Whether a comma-separated header lists `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

pub(crate) fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_in_lists() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, header::UPGRADE, "websocket"));
    }

    #[test]
    fn the_inner_service_can_be_reached() {
        let (layer, _publisher) = crate::WsLayer::builder().build().unwrap();
        let mut service = tower::Layer::layer(&layer, 7_u8);
        assert_eq!(*service.get_ref(), 7);
        *service.get_mut() = 8;
        assert_eq!(service.into_inner(), 8);
    }
}
