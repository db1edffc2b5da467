//! An event stream's task: it writes the outbox's messages as events into
//! the response body, a comment when the stream was quiet for a heartbeat
//! interval, and the `close` event last; then it cleans up as a WebSocket
//! connection does.
//!
//! The body takes one chunk at a time: while the client reads slowly, the
//! messages wait in the outbox, whose limit and policy apply as they do to
//! a WebSocket.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::Stream;
use crate::client_ip::IpSlot;
use crate::connection::outbox::{Batch, Status, Take};
use crate::connection::CLOSE_TIMEOUT;
use crate::lock::lock;
use crate::shared::Shared;
use crate::shutdown::TaskGuard;
use crate::stats::{Counters, Ended};

/// Written when the stream was quiet for a heartbeat interval.
const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// Why a stream ended, for the logs and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server ended it with this code (in the `close` event).
    ServerClosed(u16),
    /// The client went away (the response body was dropped).
    Gone,
    CloseTimeout,
    Killed,
}

impl End {
    fn counted(self) -> Ended {
        match self {
            Self::ServerClosed(_) => Ended::ServerClosed,
            Self::Gone => Ended::Gone,
            Self::CloseTimeout => Ended::CloseTimeout,
            Self::Killed => Ended::Killed,
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ServerClosed(code) => write!(f, "server closed ({code})"),
            Self::Gone => f.write_str("connection lost"),
            Self::CloseTimeout => f.write_str("close timed out"),
            Self::Killed => f.write_str("terminated at shutdown deadline"),
        }
    }
}

/// Runs one stream from its first event to the end of cleanup.
pub(super) async fn serve(
    shared: Arc<Shared>,
    stream: Arc<Stream>,
    chunks: mpsc::Sender<Bytes>,
    // Held until the stream's cleanup is done.
    counted: (TaskGuard, Option<IpSlot>),
) {
    let end = write(&shared, &stream, &chunks).await;
    drop(chunks);

    let client_id = stream.outbox.client_id();
    lock(&shared.streams.open).remove(&client_id);
    Counters::sub(&shared.hub.counters.event_streams, 1);
    let topics = std::mem::take(&mut *lock(&stream.topics));
    crate::connection::clean_up(
        &shared,
        &stream.outbox,
        stream.principal.as_ref(),
        &topics,
        end.counted(),
        &counted.0,
    );
    tracing::info!(%client_id, reason = %end, "event_stream_disconnected");
}

/// Writes events until the outbox closes or the client goes away.
async fn write(shared: &Shared, stream: &Stream, chunks: &mpsc::Sender<Bytes>) -> End {
    let outbox = &stream.outbox;
    let interval = shared.config.heartbeat_interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch = Batch::default();
    // Whether something was written since the last tick.
    let mut written = true;
    let mut deadline: Option<Instant> = None;
    let unused = Instant::now();
    loop {
        // Pongs answer WebSocket pings; a stream has none to answer.
        drop(outbox.take_control());
        let mut data_frames = 0;
        let mut close = None;
        let chunk = match outbox.take(&mut batch, &shared.hub.turns) {
            Take::Frames { data_frames: n } => {
                data_frames = n;
                let chunk = events(&batch);
                batch.clear();
                chunk
            }
            Take::Close(frame) => {
                let (code, event) = close_event(&frame);
                close = Some(code);
                event
            }
            Take::Stop if outbox.status() == Status::Killed => return End::Killed,
            Take::Stop => return End::Gone,
            Take::Idle => {
                tokio::select! {
                    biased;
                    _ = outbox.woken() => continue,
                    _ = chunks.closed() => return End::Gone,
                    _ = ticker.tick() => {
                        // Once a heartbeat, as a socket's writer does: both
                        // rooms go together, since a take swaps them.
                        outbox.release_room();
                        batch.release();
                        if std::mem::take(&mut written) {
                            continue;
                        }
                        Bytes::from_static(HEARTBEAT)
                    }
                }
            }
        };
        if outbox.status() != Status::Open {
            deadline.get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT);
        }
        // Reserving is cancel-safe: the chunk is only handed over once
        // there is room, so a wake in between loses nothing.
        loop {
            tokio::select! {
                biased;
                permit = chunks.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(chunk);
                        break;
                    }
                    Err(_) => return End::Gone,
                },
                _ = outbox.woken() => match outbox.status() {
                    Status::Killed => return End::Killed,
                    Status::Closing => {
                        deadline.get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT);
                    }
                    Status::Open => {}
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or(unused)), if deadline.is_some() => {
                    return End::CloseTimeout;
                }
            }
        }
        written = true;
        Counters::add(&shared.hub.counters.messages_sent, data_frames);
        if let Some(code) = close {
            return End::ServerClosed(code);
        }
    }
}

/// The events of a batch, as one chunk.
fn events(batch: &Batch) -> Bytes {
    if batch.len() == 1 {
        return batch[0].event().clone();
    }
    let len = batch.iter().map(|m| m.event().len()).sum();
    let mut chunk = Vec::with_capacity(len);
    for message in batch.iter() {
        chunk.extend_from_slice(message.event());
    }
    chunk.into()
}

/// The `close` event for a WebSocket Close frame: its code and reason.
fn close_event(frame: &[u8]) -> (u16, Bytes) {
    let (code, reason) = crate::frame::close_parts(frame);
    let code = code.unwrap_or(crate::close_code::NORMAL);
    let reason = String::from_utf8_lossy(reason);
    let data = serde_json::json!({ "code": code, "reason": reason });
    (code, format!("event: close\ndata: {data}\n\n").into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Draft, Message};

    #[test]
    fn a_batch_is_one_chunk_of_events() {
        let a = Draft::delta("t", "a\nb").seal(1);
        let b = Message::plain(crate::frame::text(br#"{"type":"x"}"#));
        let mut batch = Batch::default();
        batch.extend([a, b]);
        let chunk = events(&batch);
        assert_eq!(
            &chunk[..],
            b"id: 1\ndata: {\"seq\":1,\"type\":\"stream.delta\",\"requestId\":\"t\",\"text\":\"a\\nb\"}\n\n\
              data: {\"type\":\"x\"}\n\n"
        );
    }

    #[test]
    fn a_close_frame_becomes_a_close_event() {
        let (code, event) = close_event(&crate::frame::close(1001, "server shutting down"));
        assert_eq!(code, 1001);
        assert_eq!(
            &event[..],
            b"event: close\ndata: {\"code\":1001,\"reason\":\"server shutting down\"}\n\n"
        );
    }
}
