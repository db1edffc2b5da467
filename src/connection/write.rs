//! A connection's writer: the outbox's frames, pings, and the final Close.
//!
//! It only ever waits on cancel-safe futures, so a write in progress is
//! only dropped together with the socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;

use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

use super::in_flight::InFlight;
use super::outbox::{Status, Take};
use super::{Conn, WriteEnd, CLOSE_TIMEOUT};
use crate::frame::{self, close_code};
use crate::message::Message;
use crate::stats::Counters;

impl<'a> Conn<'a> {
    /// Writes the outbox's frames, pings at every heartbeat (see
    /// [`heartbeat`](super::heartbeat)), and ends with the Close frame once
    /// the outbox is closing. Writes one system call at a time so that
    /// pongs and pings go in between frames, ahead of data.
    #[allow(clippy::manual_async_fn, reason = "see `serve`")]
    pub(super) fn write_loop<'s, W: AsyncWrite + Unpin>(
        &'s self,
        io: &'s mut W,
    ) -> impl std::future::Future<Output = WriteEnd> + use<'s, 'a, W> {
        // An async block, as in `serve`: an async fn keeps its arguments
        // twice, and this state is in every connection's task.
        async move {
            let mut in_flight = InFlight::default();
            let mut ping_due = false;
            // Data frames in `in_flight` not yet counted as sent.
            let mut unsent = 0;
            // Set once the Close frame is in `in_flight`: its code.
            let mut close_code: Option<Option<u16>> = None;
            // Set once the connection starts closing: the last frames must be
            // written by then. Boxed: only a closing connection holds one.
            let mut deadline: Option<Pin<Box<Sleep>>> = None;
            let mut marked_idle = false;
            // Whether bytes were written since the last flush.
            let mut unflushed = false;
            loop {
                if self.outbox.take_beat() {
                    if self.is_dead() {
                        return WriteEnd::HeartbeatTimeout;
                    }
                    ping_due = true;
                    // Both rooms go together: a take swaps them.
                    self.outbox.release_room();
                    if in_flight.is_empty() {
                        in_flight.release();
                    }
                }
                if in_flight.at_boundary() && close_code.is_none() {
                    let mut control = self.outbox.take_control();
                    if ping_due {
                        control.push(frame::ping());
                        ping_due = false;
                    }
                    in_flight.prepend(control.into_iter());
                }
                if in_flight.is_empty() && unsent > 0 {
                    Counters::add(&self.shared.hub.counters.messages_sent, unsent);
                    unsent = 0;
                }
                if in_flight.is_empty() && unflushed {
                    // A plain socket has nothing to flush; only a stream that
                    // buffers (TLS) goes through the select below.
                    match flush_now(io).await {
                        Some(Ok(())) => unflushed = false,
                        Some(Err(_)) => return WriteEnd::Io,
                        None => {}
                    }
                }
                if in_flight.is_empty() && !unflushed {
                    if let Some(code) = close_code {
                        return WriteEnd::SentClose(code);
                    }
                    let idle = match self.outbox.take(in_flight.batch(), &self.shared.hub.turns) {
                        Take::Frames { data_frames } => {
                            unsent = data_frames;
                            false
                        }
                        Take::Close(frame) => {
                            close_code = Some(frame::close_parts(&frame).0);
                            in_flight.extend([Message::plain(frame)]);
                            false
                        }
                        Take::Stop => return WriteEnd::Stopped,
                        Take::Idle => true,
                    };
                    // Decided before waiting, so that the `Take` is not part of
                    // the waiting state.
                    if idle {
                        // The next moment a client that has not subscribed is
                        // looked at again.
                        let check_at = if self.engaged.load(Relaxed) {
                            None
                        } else {
                            [self.idle_by().filter(|_| !marked_idle), self.subscribe_by()]
                                .into_iter()
                                .flatten()
                                .min()
                        };
                        let mut check = check_at.map(|at| Box::pin(tokio::time::sleep_until(at)));
                        // One `poll_fn` rather than a `select!`: its state is
                        // part of every waiting connection's task.
                        let checking = std::future::poll_fn(|cx| {
                            if self.outbox.poll_woken(cx).is_ready() {
                                return Poll::Ready(false);
                            }
                            match check.as_mut() {
                                Some(sleep) => sleep.as_mut().poll(cx).map(|()| true),
                                None => Poll::Pending,
                            }
                        })
                        .await;
                        // It may have subscribed while this waited.
                        if checking && !self.engaged.load(Relaxed) {
                            let now = Instant::now();
                            if !marked_idle && self.idle_by().is_some_and(|at| now >= at) {
                                marked_idle = true;
                                self.shared.hub.mark_idle(self.outbox.client_id());
                            }
                            if self.subscribe_by().is_some_and(|at| now >= at) {
                                tracing::info!(client_id = %self.outbox.client_id(), "websocket_subscribe_deadline");
                                let close = frame::close(
                                    close_code::POLICY_VIOLATION,
                                    "no subscription in time",
                                );
                                self.outbox.close(Some(close), true);
                            }
                        }
                        continue;
                    }
                    if self.outbox.status() != Status::Open {
                        deadline.get_or_insert_with(close_deadline);
                    }
                }

                // In this order: a kill or a close is seen before a write
                // that waits, and a flush waits like a write (behind TLS it
                // waits for the socket). One `poll_fn`, as above.
                let event = std::future::poll_fn(|cx| {
                    if self.outbox.poll_woken(cx).is_ready() {
                        return Poll::Ready(WriterEvent::Woken);
                    }
                    if let Some(sleep) = deadline.as_mut() {
                        if sleep.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(WriterEvent::Deadline);
                        }
                    }
                    let written = if in_flight.is_empty() {
                        std::task::ready!(Pin::new(&mut *io).poll_flush(cx)).map(|()| None)
                    } else {
                        std::task::ready!(in_flight.poll_write_some(cx, io, self.deflate)).map(Some)
                    };
                    Poll::Ready(WriterEvent::Wrote(written))
                })
                .await;
                match event {
                    WriterEvent::Woken => match self.outbox.status() {
                        Status::Killed => return WriteEnd::Stopped,
                        Status::Closing => {
                            deadline.get_or_insert_with(close_deadline);
                        }
                        Status::Open => {}
                    },
                    WriterEvent::Deadline => return WriteEnd::CloseTimeout,
                    WriterEvent::Wrote(Ok(Some(n))) => {
                        in_flight.advance(n, self.deflate);
                        unflushed = true;
                    }
                    WriterEvent::Wrote(Ok(None)) => unflushed = false,
                    WriterEvent::Wrote(Err(_)) => return WriteEnd::Io,
                }
            }
        }
    }
}

impl Conn<'_> {
    // Computed where used rather than kept in locals: those would be part
    // of every connection's waiting state.

    /// When a client that never subscribed counts as idle.
    fn idle_by(&self) -> Option<Instant> {
        let limits = &self.shared.config.limits;
        limits.idle_after.map(|d| self.epoch + d)
    }

    /// When a client that never subscribed is closed, whatever the load.
    fn subscribe_by(&self) -> Option<Instant> {
        let limits = &self.shared.config.limits;
        limits.subscribe_deadline.map(|d| self.epoch + d)
    }
}

/// A closing connection's deadline for its last frames.
fn close_deadline() -> Pin<Box<Sleep>> {
    Box::pin(tokio::time::sleep(CLOSE_TIMEOUT))
}

/// Polls a flush once: `None` if it has to wait.
async fn flush_now(io: &mut (impl AsyncWrite + Unpin)) -> Option<std::io::Result<()>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *io).poll_flush(cx) {
        Poll::Ready(result) => Poll::Ready(Some(result)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// What woke the writer while it had frames to write or flush.
enum WriterEvent {
    Woken,
    Deadline,
    /// Bytes written, or `None` for a flush done.
    Wrote(std::io::Result<Option<usize>>),
}
