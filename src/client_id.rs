//! [`ClientId`]: which connection.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Identifies one connection for as long as the process runs.
///
/// Displayed as `ws-<n>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u64);

impl ClientId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Relaxed))
    }

    pub(crate) fn from_u64(id: u64) -> Self {
        Self(id)
    }

    /// The id as a number, unique within this process.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws-{}", self.0)
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_display_with_a_prefix() {
        let id = ClientId::next();
        assert_eq!(id.to_string(), format!("ws-{}", id.as_u64()));
    }
}
