//! Which address a handshake comes from, and how many connections each
//! address holds.
//!
//! The address is, in order: the last entry of the configured trusted proxy
//! header (what the proxy in front saw), or the [`SocketAddr`] the server
//! put in the request's extensions. Without either, the address is unknown
//! and only the global limit applies.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::header::{HeaderMap, HeaderName};
use hyper::http::Extensions;

use crate::lock::lock;

/// The client's address for a handshake, if it can be told.
pub(crate) fn client_ip(
    headers: &HeaderMap,
    extensions: &Extensions,
    trusted_header: Option<&HeaderName>,
) -> Option<IpAddr> {
    if let Some(name) = trusted_header {
        // Each proxy appends what it saw; the last entry is from the proxy
        // we trust. Earlier entries are the client's own claims.
        return headers
            .get_all(name)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| parse_ip(v.trim()));
    }
    extensions.get::<SocketAddr>().map(SocketAddr::ip)
}

/// An address, or an address with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_ip(value: &str) -> Option<IpAddr> {
    value
        .parse::<IpAddr>()
        .ok()
        .or_else(|| value.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// Connections per address, and the one warning that they may all be a
/// reverse proxy's.
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
    proxy_warned: AtomicBool,
}

/// One connection's place in its address's count, given back on drop.
pub(crate) struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Takes a place for `ip` unless it holds `max` already; with the
    /// place, how many `ip` holds now.
    pub(crate) fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<(IpSlot, usize)> {
        let mut counts = lock(&self.counts);
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *count += 1;
        let held = *count;
        let slot = IpSlot {
            per_ip: self.clone(),
            ip,
        };
        Some((slot, held))
    }

    /// Warns, once, when handshakes look like they come through a reverse
    /// proxy the layer was not told of (no `trusted_proxy_header`): then
    /// every client has the proxy's address, and `max_connections_per_ip`
    /// caps the whole deployment.
    pub(crate) fn warn_if_proxied(&self, headers: &HeaderMap, ip: IpAddr, held: usize, max: usize) {
        if self.proxy_warned.load(Ordering::Relaxed) {
            return;
        }
        let Some(why) = proxy_suspected(headers, ip, held, max) else {
            return;
        };
        if !self.proxy_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %ip,
                connections = held,
                max_per_ip = max,
                why,
                "websocket_proxy_suspected: set trusted_proxy_header to the header your proxy sets, \
                 or every client behind it shares one address and its limit"
            );
        }
    }
}

/// Why handshakes from `ip`, which holds `held` of its `max` places, look
/// like a reverse proxy's; `None` if they do not.
fn proxy_suspected(
    headers: &HeaderMap,
    ip: IpAddr,
    held: usize,
    max: usize,
) -> Option<&'static str> {
    const FORWARDING: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];
    if FORWARDING.iter().any(|name| headers.contains_key(*name)) {
        return Some("handshakes carry forwarding headers");
    }
    let local = match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        // Loopback, or unique local (fc00::/7).
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    (local && max >= 2 && held >= max / 2)
        .then_some("half the per-address limit is held by one loopback or private address")
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.per_ip.counts);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trusted_header_wins_and_its_last_entry_counts() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "6.6.6.6, 10.0.0.1".parse().unwrap());
        let mut extensions = Extensions::new();
        extensions.insert(SocketAddr::from(([127, 0, 0, 1], 9)));
        let name = HeaderName::from_static("x-forwarded-for");
        assert_eq!(
            client_ip(&headers, &extensions, Some(&name)),
            "10.0.0.1".parse().ok()
        );
        assert_eq!(
            client_ip(&headers, &extensions, None),
            "127.0.0.1".parse().ok()
        );
        assert_eq!(
            client_ip(&HeaderMap::new(), &Extensions::new(), Some(&name)),
            None
        );
        assert_eq!(parse_ip("[::1]:80"), "::1".parse().ok());
    }

    #[test]
    fn places_per_address_are_counted_and_given_back() {
        let per_ip = Arc::new(PerIp::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (a, held) = per_ip.try_take(ip, 2).unwrap();
        assert_eq!(held, 1);
        let (_b, held) = per_ip.try_take(ip, 2).unwrap();
        assert_eq!(held, 2);
        assert!(per_ip.try_take(ip, 2).is_none());
        drop(a);
        assert!(per_ip.try_take(ip, 2).is_some());
        assert!(per_ip.try_take("10.0.0.2".parse().unwrap(), 2).is_some());
    }

    #[test]
    fn a_proxy_is_suspected_from_its_headers_or_a_crowded_local_address() {
        let none = HeaderMap::new();
        let local: IpAddr = "10.0.0.1".parse().unwrap();
        let public: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(proxy_suspected(&none, local, 127, 256), None);
        assert!(proxy_suspected(&none, local, 128, 256).is_some());
        assert!(proxy_suspected(&none, "::1".parse().unwrap(), 128, 256).is_some());
        assert!(proxy_suspected(&none, "fd00::1".parse().unwrap(), 128, 256).is_some());
        assert_eq!(proxy_suspected(&none, public, 256, 256), None);
        let mut forwarded = HeaderMap::new();
        forwarded.insert("x-forwarded-for", "198.51.100.2".parse().unwrap());
        assert!(proxy_suspected(&forwarded, public, 1, 256).is_some());
    }
}
