//! Which `Origin`s may open a WebSocket.
//!
//! Browsers send `Origin` on every WebSocket handshake and let any page open
//! a socket to any host, so without a check a hostile page could read the
//! streams of a logged-in user (cross-site WebSocket hijacking). The
//! default policy accepts:
//!
//! - requests without `Origin` (non-browser clients, which a page cannot
//!   impersonate);
//! - a same-origin `Origin`: its host and port equal the `Host` header's;
//! - an `Origin` on the configured allowlist (scheme, host and port equal;
//!   the host compared without regard to case, default ports implied).
//!
//! Allowing any origin is an explicit opt-in.

use std::fmt;

/// A parsed `scheme://host[:port]`, lowercased, with the port made explicit.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses a serialized origin as browsers send it. `None` for `null`,
    /// paths, user info, unknown schemes and other malformed values.
    pub(crate) fn parse(value: &str) -> Option<Self> {
        let (scheme, authority) = value.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = default_port(&scheme)?;
        let (host, port) = split_host_port(authority)?;
        Some(Self {
            scheme,
            host,
            port: port.unwrap_or(default_port),
        })
    }

    /// Whether this origin names the host the request was sent to.
    fn is_same_origin(&self, host_header: &str) -> bool {
        match split_host_port(host_header) {
            Some((host, port)) => {
                let implied = default_port(&self.scheme).expect("a parsed scheme");
                host == self.host && port.unwrap_or(implied) == self.port
            }
            None => false,
        }
    }
}

/// The port a scheme implies; `None` for one an origin cannot have.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Splits `host[:port]` (IPv6 hosts in brackets); lowercases the host.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (ipv6, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{ipv6}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() || host.contains(':') && !host.starts_with('[') {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// The configured policy.
#[derive(Clone)]
pub(crate) enum OriginPolicy {
    /// Same-origin, absent, or one of these.
    Allowlist(Vec<Origin>),
    /// Any origin at all.
    Any,
}

impl OriginPolicy {
    /// Whether a handshake with this `Origin` (if any) to this `Host` (if
    /// any) may proceed.
    pub(crate) fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        match self {
            Self::Any => true,
            Self::Allowlist(allowed) => match Origin::parse(origin) {
                Some(origin) => {
                    host.is_some_and(|h| origin.is_same_origin(h)) || allowed.contains(&origin)
                }
                None => false,
            },
        }
    }
}

impl fmt::Debug for OriginPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("Any"),
            Self::Allowlist(list) => f.debug_tuple("SameOriginOr").field(list).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(origins: &[&str]) -> OriginPolicy {
        OriginPolicy::Allowlist(origins.iter().map(|o| Origin::parse(o).unwrap()).collect())
    }

    #[test]
    fn absent_origin_is_accepted() {
        assert!(list(&[]).allows(None, Some("example.com")));
    }

    #[test]
    fn same_origin_is_accepted_with_default_ports() {
        let p = list(&[]);
        assert!(p.allows(Some("http://localhost:3000"), Some("localhost:3000")));
        assert!(p.allows(Some("https://App.Example.com"), Some("app.example.com")));
        assert!(p.allows(Some("http://[::1]:8080"), Some("[::1]:8080")));
        assert!(!p.allows(Some("http://localhost:3001"), Some("localhost:3000")));
        assert!(!p.allows(Some("https://example.com"), Some("example.com:80")));
        assert!(!p.allows(Some("http://evil.com"), Some("example.com")));
        assert!(!p.allows(Some("http://example.com"), None));
    }

    #[test]
    fn allowlist_matches_scheme_host_and_port() {
        let p = list(&["https://app.example.com", "http://localhost:4200"]);
        assert!(p.allows(Some("https://APP.example.com"), Some("api.example.com")));
        assert!(p.allows(Some("https://app.example.com:443"), Some("api.example.com")));
        assert!(p.allows(Some("http://localhost:4200"), Some("api")));
        assert!(!p.allows(Some("http://app.example.com"), Some("api")));
        assert!(!p.allows(Some("https://app.example.com.evil.com"), Some("api")));
        assert!(!p.allows(Some("null"), Some("api")));
    }

    #[test]
    fn any_allows_everything() {
        assert!(OriginPolicy::Any.allows(Some("null"), None));
    }

    #[test]
    fn malformed_origins_do_not_parse() {
        for bad in [
            "",
            "null",
            "example.com",
            "ftp://x",
            "http://",
            "http://a/b",
            "http://u@h",
            "http://h:99999",
            "http://a:b:c",
        ] {
            assert!(Origin::parse(bad).is_none(), "{bad}");
        }
    }
}
