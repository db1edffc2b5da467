//! A token bucket for one connection's inbound messages.

use tokio::time::Instant;

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
/// is the same for every connection, and this is kept by each).
pub(crate) struct RateLimit {
    tokens: f64,
    last: Instant,
    /// Messages refused, less one for each allowed since: a client that
    /// keeps sending well over the rate piles them up, one that is only
    /// briefly over does not.
    strikes: u32,
}

impl RateLimit {
    /// A full bucket for `rate`.
    pub(crate) fn new(rate: MessageRate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            last: now,
            strikes: 0,
        }
    }

    pub(crate) fn check(&mut self, rate: MessageRate, now: Instant) -> Verdict {
        let burst = f64::from(rate.burst);
        let refill =
            now.saturating_duration_since(self.last).as_secs_f64() * f64::from(rate.per_second);
        self.tokens = (self.tokens + refill).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = self.strikes.saturating_sub(1);
            return Verdict::Allowed;
        }
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
    use std::time::Duration;

    #[test]
    fn bursts_then_the_rate_then_closing_when_it_persists() {
        let start = Instant::now();
        let rate = MessageRate::per_second(10).burst(5);
        let mut limit = RateLimit::new(rate, start);
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
