//! One connection's bounded outbound queue.
//!
//! Publishers push prebuilt frames without ever waiting: a push either
//! queues the frame, or finds the queue over its byte limit and marks the
//! connection for closing. The connection's writer drains the queue in
//! batches. Control frames (pongs) sit in their own short queue and go out
//! before queued data.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::ClientId;

/// The queue shared by publishers (push) and the connection's writer (take).
pub(crate) struct Outbox {
    client_id: ClientId,
    max_bytes: usize,
    state: Mutex<State>,
    /// Woken on the first frame after the queue was empty, and on every
    /// change of the closing state.
    wake: Notify,
}

#[derive(Default)]
struct State {
    data: VecDeque<Bytes>,
    data_bytes: usize,
    control: Vec<Bytes>,
    closing: Option<Closing>,
    close_sent: bool,
    killed: bool,
}

struct Closing {
    /// The Close frame to send last, if the connection is still writable.
    frame: Option<Bytes>,
}

/// What a push did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued for the writer.
    Queued,
    /// Not queued: the queue would have passed its limit. The connection is
    /// now closing with 1013 and everything it had queued was discarded;
    /// `discarded` counts those frames plus the rejected one.
    Overflowed { discarded: usize },
    /// Not queued: the connection is already closing.
    Closed,
}

/// What the writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// `batch` holds frames to write; `data_frames` of them are messages.
    Frames { data_frames: usize },
    /// Nothing to write; wait for a wake.
    Idle,
    /// Everything is written; send this Close frame and stop writing.
    Close(Bytes),
    /// Stop now without writing anything more.
    Stop,
}

impl Outbox {
    pub(crate) fn new(client_id: ClientId, max_bytes: usize) -> Self {
        Self {
            client_id,
            max_bytes,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    pub(crate) fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// Queues a data frame unless that would pass the byte limit. A frame
    /// always fits an empty queue, so one message larger than the limit is
    /// still delivered to a client that keeps up.
    pub(crate) fn push(&self, frame: Bytes) -> Push {
        let mut state = self.lock();
        if state.closing.is_some() || state.killed {
            return Push::Closed;
        }
        if state.data_bytes > 0 && state.data_bytes + frame.len() > self.max_bytes {
            let discarded = state.data.len() + 1;
            state.data.clear();
            state.data_bytes = 0;
            state.closing = Some(Closing {
                frame: Some(crate::frame::close(
                    crate::close_code::TRY_AGAIN_LATER,
                    "outbound queue full",
                )),
            });
            drop(state);
            self.wake.notify_one();
            return Push::Overflowed { discarded };
        }
        let was_empty = state.data.is_empty() && state.control.is_empty();
        state.data_bytes += frame.len();
        state.data.push_back(frame);
        drop(state);
        if was_empty {
            self.wake.notify_one();
        }
        Push::Queued
    }

    /// Queues a control frame (a pong) ahead of all data.
    pub(crate) fn push_control(&self, frame: Bytes) {
        let mut state = self.lock();
        if state.closing.is_some() || state.killed {
            return;
        }
        state.control.push(frame);
        drop(state);
        self.wake.notify_one();
    }

    /// Starts closing: no new frames are accepted. With `flush`, what is
    /// queued is written first; otherwise it is discarded. `frame` is the
    /// Close frame to end with, or `None` when the peer is gone. A closing
    /// already under way is left as it is. Returns how many queued data
    /// frames were discarded.
    pub(crate) fn close(&self, frame: Option<Bytes>, flush: bool) -> usize {
        let mut state = self.lock();
        if state.closing.is_some() {
            return 0;
        }
        let discarded = if flush {
            0
        } else {
            state.data_bytes = 0;
            std::mem::take(&mut state.data).len()
        };
        state.closing = Some(Closing { frame });
        drop(state);
        self.wake.notify_one();
        discarded
    }

    /// Makes the writer stop at once, abandoning even a write in progress.
    /// Returns how many queued data frames were discarded.
    pub(crate) fn kill(&self) -> usize {
        let mut state = self.lock();
        state.killed = true;
        state.data_bytes = 0;
        let discarded = std::mem::take(&mut state.data).len();
        drop(state);
        self.wake.notify_one();
        discarded
    }

    /// Moves what the writer should send next into `batch`.
    pub(crate) fn take(&self, batch: &mut Vec<Bytes>) -> Take {
        let mut state = self.lock();
        if state.killed || state.close_sent {
            return Take::Stop;
        }
        batch.append(&mut state.control);
        let data_frames = state.data.len();
        batch.extend(state.data.drain(..));
        state.data_bytes = 0;
        if !batch.is_empty() {
            return Take::Frames { data_frames };
        }
        let state = &mut *state;
        match &mut state.closing {
            None => Take::Idle,
            Some(closing) => {
                state.close_sent = true;
                match closing.frame.take() {
                    Some(frame) => Take::Close(frame),
                    None => Take::Stop,
                }
            }
        }
    }

    /// Whether the connection is closing or killed.
    pub(crate) fn status(&self) -> Status {
        let state = self.lock();
        if state.killed {
            Status::Killed
        } else if state.closing.is_some() {
            Status::Closing
        } else {
            Status::Open
        }
    }

    /// Waits for a wake (see [`Outbox::wake`]). Cancel-safe: a wake that
    /// races with dropping this future is caught by the writer looking at
    /// the state again before it waits.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // No code panics while holding this lock, and every state it can hold
        // is consistent, so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The closing state of an [`Outbox`].
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Status {
    Open,
    Closing,
    Killed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(max: usize) -> Outbox {
        Outbox::new(ClientId::next(), max)
    }

    #[test]
    fn control_frames_go_before_data() {
        let o = outbox(100);
        assert_eq!(o.push(Bytes::from_static(b"d1")), Push::Queued);
        o.push_control(Bytes::from_static(b"c1"));
        let mut batch = Vec::new();
        assert_eq!(o.take(&mut batch), Take::Frames { data_frames: 1 });
        assert_eq!(batch, [&b"c1"[..], &b"d1"[..]]);
        batch.clear();
        assert_eq!(o.take(&mut batch), Take::Idle);
    }

    #[test]
    fn overflow_discards_the_queue_and_closes_with_1013() {
        let o = outbox(10);
        assert_eq!(o.push(Bytes::from_static(b"123456")), Push::Queued);
        assert_eq!(
            o.push(Bytes::from_static(b"123456")),
            Push::Overflowed { discarded: 2 }
        );
        assert_eq!(o.push(Bytes::from_static(b"1")), Push::Closed);
        let mut batch = Vec::new();
        match o.take(&mut batch) {
            Take::Close(frame) => assert_eq!(&frame[2..4], &1013u16.to_be_bytes()),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(o.take(&mut batch), Take::Stop);
    }

    #[test]
    fn one_large_frame_fits_an_empty_queue() {
        let o = outbox(4);
        assert_eq!(o.push(Bytes::from_static(b"123456789")), Push::Queued);
    }

    #[test]
    fn flushing_close_writes_queued_data_first() {
        let o = outbox(100);
        o.push(Bytes::from_static(b"d1"));
        assert_eq!(o.close(Some(Bytes::from_static(b"bye")), true), 0);
        let mut batch = Vec::new();
        assert_eq!(o.take(&mut batch), Take::Frames { data_frames: 1 });
        batch.clear();
        assert_eq!(o.take(&mut batch), Take::Close(Bytes::from_static(b"bye")));
    }

    #[test]
    fn kill_stops_the_writer() {
        let o = outbox(100);
        o.push(Bytes::from_static(b"d1"));
        assert_eq!(o.kill(), 1);
        assert_eq!(o.status(), Status::Killed);
        assert_eq!(o.take(&mut Vec::new()), Take::Stop);
    }
}
