//! A token bucket for one connection's inbound messages.

use std::time::Duration;

/// How many messages (and pings) a connection may send: a sustained rate,
/// and the burst it may send at once (a token bucket). See
/// [`WsLayerBuilder::message_rate`](crate::WsLayerBuilder::message_rate).
///
/// ```
/// use tower_ws::{MessageRate, WsLayer};
///
/// let rate = MessageRate::per_second(20).burst(50);
/// let (layer, publisher) = WsLayer::builder().message_rate(rate).build()?;
/// # Ok::<(), tower_ws::BuildError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRate {
    pub(crate) per_second: u32,
    pub(crate) burst: u32,
}

impl MessageRate {
    /// `n` messages a second on average, in bursts of up to twice that.
    pub const fn per_second(n: u32) -> Self {
        Self {
            per_second: n,
            burst: n.saturating_mul(2),
        }
    }

    /// Bursts of up to `n` messages.
    pub const fn burst(mut self, n: u32) -> Self {
        self.burst = n;
        self
    }
}

/// What the bucket says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the rate.
    Allowed,
    /// Over the rate: not processed, the client is told.
    Limited,
    /// Over the rate for more than `burst` messages (net of those allowed
    /// since): close the connection.
    Exceeded,
}

/// The bucket's state; the rate is the layer's, given to each check (it
/// is the same for every connection, and this is kept by each). Times are
/// given as durations since the bucket's start, and kept in 16 bytes: a
/// socket's bucket is in its task's state.
pub(crate) struct RateLimit {
    /// `f32`: a fraction of a token is all the precision a rate needs.
    tokens: f32,
    /// Messages refused, less one for each allowed since: a client that
    /// keeps sending well over the rate piles them up, one that is only
    /// briefly over does not.
    strikes: u32,
    /// When the bucket was last filled, in milliseconds since its start.
    last_ms: u64,
}

impl RateLimit {
    /// A full bucket for `rate`.
    pub(crate) fn new(rate: MessageRate) -> Self {
        Self {
            tokens: rate.burst as f32,
            strikes: 0,
            last_ms: 0,
        }
    }

    /// The verdict on a message that came `now` after the bucket's start.
    pub(crate) fn check(&mut self, rate: MessageRate, now: Duration) -> Verdict {
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        let burst = f64::from(rate.burst);
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        let tokens = (f64::from(self.tokens) + elapsed * f64::from(rate.per_second)).min(burst);
        self.last_ms = self.last_ms.max(now_ms);
        if tokens >= 1.0 {
            self.tokens = (tokens - 1.0) as f32;
            self.strikes = self.strikes.saturating_sub(1);
            return Verdict::Allowed;
        }
        self.tokens = tokens as f32;
        self.strikes += 1;
        if f64::from(self.strikes) > burst {
            Verdict::Exceeded
        } else {
            Verdict::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_the_rate_then_closing_when_it_persists() {
        let start = Duration::ZERO;
        let rate = MessageRate::per_second(10).burst(5);
        let mut limit = RateLimit::new(rate);
        for _ in 0..5 {
            assert_eq!(limit.check(rate, start), Verdict::Allowed);
        }
        assert_eq!(limit.check(rate, start), Verdict::Limited);
        // 100 ms later one token is back.
        let later = start + Duration::from_millis(100);
        assert_eq!(limit.check(rate, later), Verdict::Allowed);
        for _ in 0..5 {
            assert_eq!(limit.check(rate, later), Verdict::Limited);
        }
        assert_eq!(limit.check(rate, later), Verdict::Exceeded);
    }
}
