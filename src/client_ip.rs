//! Which address a handshake comes from, and how many connections each
//! address holds.
//!
//! The address is, in order: the last entry of the configured trusted proxy
//! header (what the proxy in front saw), or the [`SocketAddr`] the server
//! put in the request's extensions. Without either, the address is unknown
//! and only the global limit applies.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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

/// Connections per address.
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its address's count, given back on drop.
pub(crate) struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Takes a place for `ip` unless it holds `max` already.
    pub(crate) fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut counts = lock(&self.counts);
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }
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
        let a = per_ip.try_take(ip, 2).unwrap();
        let _b = per_ip.try_take(ip, 2).unwrap();
        assert!(per_ip.try_take(ip, 2).is_none());
        drop(a);
        assert!(per_ip.try_take(ip, 2).is_some());
        assert!(per_ip.try_take("10.0.0.2".parse().unwrap(), 2).is_some());
    }
}
