//! Who may connect, and who may read which stream (see the crate docs,
//! [Authorization](crate#authorization)).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use hyper::header::{self, HeaderMap};
use hyper::http::Extensions;
use hyper::Uri;

/// The handshake request, as the [`authorize`](crate::WsLayerBuilder::authorize)
/// hook sees it.
pub struct UpgradeRequest<'a> {
    pub(crate) uri: &'a Uri,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) extensions: &'a Extensions,
    pub(crate) peer: Option<SocketAddr>,
}

impl<'a> UpgradeRequest<'a> {
    /// The request's headers (cookies included).
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request's extensions: what middleware in front of the layer
    /// put there, a session or an authenticated user, say.
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }

    /// The request URI, with its query.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The client's address, when the server put a [`SocketAddr`] in the
    /// request's extensions (`None` otherwise).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The subprotocols the client offered in `Sec-WebSocket-Protocol`, in
    /// order.
    pub fn protocols(&self) -> impl Iterator<Item = &'a str> {
        header_tokens(self.headers, header::SEC_WEBSOCKET_PROTOCOL)
    }
}

/// The comma-separated tokens of every `name` header, trimmed, in order.
pub(crate) fn header_tokens(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

impl fmt::Debug for UpgradeRequest<'_> {
    // Headers may hold credentials: show only the path and the peer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeRequest")
            .field("path", &self.uri.path())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Who a connection belongs to, as the `authorize` hook decided.
#[derive(Clone)]
pub struct Principal {
    id: String,
    protocol: Option<String>,
    data: Option<Arc<dyn Any + Send + Sync>>,
}

impl Principal {
    /// A principal with this id (a user id, say), logged with the
    /// connection.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            protocol: None,
            data: None,
        }
    }

    /// Accepts this subprotocol: the `101` names it in
    /// `Sec-WebSocket-Protocol`. It must be one the client offered.
    pub fn with_protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocol = Some(protocol.into());
        self
    }

    /// Attaches application data (roles, tenant, …) for the subscribe hook.
    pub fn with_data<T: Any + Send + Sync>(mut self, data: T) -> Self {
        self.data = Some(Arc::new(data));
        self
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The accepted subprotocol, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The attached data, if it is a `T`.
    pub fn data<T: Any>(&self) -> Option<&T> {
        self.data.as_deref()?.downcast_ref()
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("id", &self.id)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// Why the `authorize` hook refused a handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct Rejection {
    pub(crate) status: u16,
    pub(crate) reason: String,
}

impl Rejection {
    /// `401 Unauthorized`: no or invalid credentials. `reason` is logged,
    /// not sent; keep secrets out of it.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self {
            status: 401,
            reason: reason.into(),
        }
    }

    /// `403 Forbidden`: valid credentials that may not connect. `reason` is
    /// logged, not sent.
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self {
            status: 403,
            reason: reason.into(),
        }
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rejection({}: {})", self.status, self.reason)
    }
}

/// What an async `authorize` hook's future resolves to.
pub(crate) type Decision = Pin<Box<dyn Future<Output = Result<Principal, Rejection>> + Send>>;
type AuthorizeFn = dyn Fn(&UpgradeRequest<'_>) -> Result<Principal, Rejection> + Send + Sync;
pub(crate) type AuthorizeLaterFn = dyn Fn(&UpgradeRequest<'_>) -> Decision + Send + Sync;
type SubscribeFn = dyn Fn(Option<&Principal>, &str) -> bool + Send + Sync;

/// The `authorize` hook: deciding at once, or with a future.
#[derive(Clone)]
pub(crate) enum Authorize {
    Now(Arc<AuthorizeFn>),
    Later(Arc<AuthorizeLaterFn>),
}

/// The configured hooks; `Debug` does not show the closures.
#[derive(Clone, Default)]
pub(crate) struct AuthHooks {
    pub(crate) authorize: Option<Authorize>,
    pub(crate) subscribe: Option<Arc<SubscribeFn>>,
}

impl AuthHooks {
    /// Whether `principal` may subscribe to `topic`.
    pub(crate) fn may_subscribe(&self, principal: Option<&Principal>, topic: &str) -> bool {
        self.subscribe.as_ref().is_none_or(|f| f(principal, topic))
    }
}

impl fmt::Debug for AuthHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let authorize = match &self.authorize {
            None => "none",
            Some(Authorize::Now(_)) => "sync",
            Some(Authorize::Later(_)) => "async",
        };
        f.debug_struct("AuthHooks")
            .field("authorize", &authorize)
            .field("subscribe", &self.subscribe.is_some())
            .finish()
    }
}
