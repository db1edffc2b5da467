//! A connection's reader: whole client messages from the [`Decoder`], the
//! message rate, pings answered, and the client's Close.

use tokio::io::AsyncRead;

use super::subscriptions::Subscriptions;
use super::{Conn, ReadEnd, Reason};
use crate::frame::{self, close_code, DecodeError, Decoded, Decoder};
use crate::inbound::Inbound;
use crate::protocol::{self, error_code};
use crate::rate_limit::{RateLimit, Verdict};

impl<'a> Conn<'a> {
    /// Reads and handles frames until the connection ends. After a
    /// violation it starts the close and keeps reading, discarding, until
    /// the client hangs up (bounded by the close timeout): closing a socket
    /// with unread input makes the kernel reset it, and the client would
    /// lose the Close frame that says why.
    #[allow(clippy::manual_async_fn, reason = "see `serve`")]
    #[allow(
        clippy::blocks_in_conditions,
        reason = "a block in the scrutinee keeps its locals out of the draining state"
    )]
    pub(super) fn read_loop<'s, R: AsyncRead + Unpin>(
        &'s self,
        decoder: &'s mut Decoder<R>,
        topics: &'s mut Subscriptions,
    ) -> impl std::future::Future<Output = Reason> + use<'s, 'a, R> {
        // An async block, as in `serve`: an async fn keeps its arguments
        // twice, and this state is in every connection's task.
        async move {
            // The loop in the match's scrutinee, so that neither the bucket
            // nor the whole `ReadEnd` is kept while draining.
            let (code, reason) = match {
                let mut rate = RateLimit::new(self.shared.config.limits.message_rate);
                // The loop here, not in a helper this awaits: each level of
                // future would keep its own copy of the references in the task.
                loop {
                    let max_message = self.shared.config.max_message_size;
                    let found =
                        std::future::poll_fn(|cx| decoder.poll_frame(cx, max_message)).await;
                    let decoded = match found.and_then(|found| decoder.decode(found, max_message)) {
                        Ok(decoded) => decoded,
                        Err(DecodeError::Gone) => break ReadEnd::Gone,
                        Err(DecodeError::Violation { code, reason }) => {
                            break ReadEnd::Violation { code, reason }
                        }
                        Err(DecodeError::Broken { code, reason }) => {
                            break ReadEnd::Broken { code, reason }
                        }
                    };
                    self.touch();
                    // Whole messages and pings count against the rate.
                    if matches!(
                        decoded,
                        Decoded::Text(_) | Decoded::Binary(_) | Decoded::Ping(_)
                    ) {
                        match rate
                            .check(self.shared.config.limits.message_rate, self.epoch.elapsed())
                        {
                            Verdict::Allowed => {}
                            Verdict::Limited => {
                                self.send_error(
                                    protocol::UNKNOWN_REQUEST_ID,
                                    error_code::RATE_LIMITED,
                                    "too many messages; this one was not processed",
                                );
                                continue;
                            }
                            Verdict::Exceeded => {
                                break ReadEnd::Violation {
                                    code: close_code::POLICY_VIOLATION,
                                    reason: "message rate exceeded",
                                }
                            }
                        }
                    }
                    let inbound = match decoded {
                        Decoded::Text(text) => Inbound::Text(text),
                        Decoded::Binary(payload) => Inbound::Binary(payload),
                        Decoded::Ping(payload) => {
                            self.outbox.push_control(frame::pong(payload));
                            continue;
                        }
                        Decoded::Close(code) => {
                            let reply = match code {
                                Some(code) => frame::close(code, ""),
                                None => frame::close_empty(),
                            };
                            break ReadEnd::ClientClosed { code, reply };
                        }
                        Decoded::Pong | Decoded::Fragment => continue,
                    };
                    if let Err(end) = self.on_message(inbound, topics) {
                        break end;
                    }
                }
            } {
                ReadEnd::Violation { code, reason } => (code, reason),
                end => return self.reader_ended(end),
            };
            tracing::debug!(client_id = %self.outbox.client_id(), code, reason, "websocket_protocol_violation");
            // What was queued before the violation still goes out first.
            self.discarded(self.outbox.close(Some(frame::close(code, reason)), true));
            // Boxed: only a client that broke the protocol waits here.
            Box::pin(decoder.drain(self.shared.config.max_message_size)).await;
            self.reader_ended(ReadEnd::Violation { code, reason })
        }
    }
}
