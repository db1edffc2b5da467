//! One connection's bounded outbound queue, and what happens when it fills.
//!
//! Publishers push sealed messages without ever waiting. Past half the
//! byte limit, a `stream.delta` joins the queued delta of its topic right
//! before it (under [`SlowClientPolicy::Coalesce`]); at the limit, the
//! policy decides: merge every run of same-topic deltas in the queue, close
//! the connection, or drop the new message. The connection's writer takes
//! the queue in batches of at most [`MAX_BATCH_BYTES`]; control frames
//! (pongs) have their own short queue, which the writer looks at between
//! any two frames (see [`crate::pending`]), so they never wait behind
//! queued data.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::message::{MergedDelta, Message};
use crate::ClientId;

/// The most bytes of data the writer takes at once: several vectored
/// writes' worth, so a busy connection takes its queue's lock and is woken
/// less often, small enough that its buffers stay small.
pub(crate) const MAX_BATCH_BYTES: usize = 64 << 10;
/// A drained queue with more room than this many entries gives it back.
const KEEP_CAPACITY: usize = 256;

/// What the layer does with a client whose outbound queue is full, that
/// is, one that reads more slowly than messages are published to it.
///
/// Whatever the policy, publishers and other clients never wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowClientPolicy {
    /// Once the queue is half full, each `stream.delta` is merged into the
    /// queued delta of the same topic right before it, if there is one: a
    /// single message with the texts concatenated, `seq` of the last one
    /// merged and `seqStart` of the first, so the reader catches up with
    /// fewer, larger frames and loses no text. When the queue is full, every
    /// run of consecutive same-topic deltas in it is merged; if that does
    /// not make room, the client is closed as under
    /// [`Close`](Self::Close). Other messages are never merged or dropped.
    #[default]
    Coalesce,
    /// When the queue is full, the client is closed with 1013 (try again
    /// later) and what was queued for it is discarded. With topic history
    /// it can reconnect and resume from its last `seq`.
    Close,
    /// When the queue is full, the new message is not queued for that
    /// client (counted in `messages_dropped`); the client sees a gap in
    /// `seq`. The connection stays open.
    DropNewest,
}

/// One entry of the data queue, and of a [`Batch`] taken from it. Merges
/// are rare, so they are boxed to keep every other entry small.
enum Queued {
    One(Message),
    Merged(Box<Merged>),
}

/// Deltas merged in the queue, and their frame, built once it is first
/// asked for: by then the merge has left the queue, so nothing is appended
/// to it any more.
struct Merged {
    delta: MergedDelta,
    built: OnceLock<Message>,
}

impl Queued {
    fn len(&self) -> usize {
        match self {
            Self::One(m) => m.len(),
            Self::Merged(m) => m.delta.len(),
        }
    }

    #[inline]
    fn message(&self) -> &Message {
        match self {
            Self::One(m) => m,
            Self::Merged(m) => m.built.get_or_init(|| m.delta.build()),
        }
    }

    /// Merges `next` into this entry if both are deltas of one topic;
    /// gives it back otherwise.
    fn merge(&mut self, next: Message) -> Result<(), Message> {
        match self {
            Self::Merged(merged) => {
                if merged.delta.append(&next) {
                    Ok(())
                } else {
                    Err(next)
                }
            }
            Self::One(first) => {
                let Some(mut delta) = MergedDelta::start(first) else {
                    return Err(next);
                };
                if !delta.append(&next) {
                    return Err(next);
                }
                *self = Self::Merged(Box::new(Merged {
                    delta,
                    built: OnceLock::new(),
                }));
                Ok(())
            }
        }
    }
}

/// Messages taken from an outbox, oldest first. It holds the queue's own
/// entries, so that taking a whole queue is a swap, not a copy.
#[derive(Default)]
pub(crate) struct Batch(VecDeque<Queued>);

impl Batch {
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[inline]
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = &Message> + '_ {
        self.0.iter().map(Queued::message)
    }

    /// Drops the first `n` messages.
    #[inline]
    pub(crate) fn drop_front(&mut self, n: usize) {
        self.0.drain(..n);
    }

    pub(crate) fn push_front(&mut self, message: Message) {
        self.0.push_front(Queued::One(message));
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    /// Gives back the room an empty batch grew to.
    pub(crate) fn release(&mut self) {
        debug_assert!(self.0.is_empty());
        self.0 = VecDeque::new();
    }
}

impl Extend<Message> for Batch {
    fn extend<I: IntoIterator<Item = Message>>(&mut self, messages: I) {
        self.0.extend(messages.into_iter().map(Queued::One));
    }
}

impl std::ops::Index<usize> for Batch {
    type Output = Message;

    fn index(&self, i: usize) -> &Message {
        self.0[i].message()
    }
}

/// The queue shared by publishers (push) and the connection's writer (take).
pub(crate) struct Outbox {
    client_id: ClientId,
    max_bytes: usize,
    policy: SlowClientPolicy,
    state: Mutex<State>,
    /// Set by the shared heartbeat, taken by the writer.
    beat: AtomicBool,
    /// When the client was last heard from, in milliseconds since its
    /// connection began (see `Conn::touch`). Here rather than in the
    /// connection's task, whose state every connection holds: the outbox
    /// has the room.
    heard_ms: AtomicU64,
}

#[derive(Default)]
struct State {
    data: VecDeque<Queued>,
    data_bytes: usize,
    control: Vec<Bytes>,
    /// Boxed: only a closing connection holds one, and every connection
    /// holds an outbox.
    closing: Option<Box<Closing>>,
    close_sent: bool,
    killed: bool,
    /// A wake the writer has not seen yet: set on the first frame after
    /// the queue was empty, on every change of the closing state, and on
    /// a heartbeat.
    woken: bool,
    /// The writer's task while it waits. One task waits on an outbox, so
    /// one waker (not a `Notify` and its wait list) is enough.
    waiter: Option<Waker>,
    /// A push woke the writer for data and it has not taken the queue
    /// since: it owes [`Turns`] a turn.
    owes_turn: bool,
}

struct Closing {
    /// The Close frame to send last, if the connection is still writable.
    frame: Option<Bytes>,
}

/// What a push did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued for the writer; `coalesced` deltas were merged into others
    /// to make or save room.
    Queued { coalesced: usize },
    /// Not queued: the queue is full and the policy is
    /// [`SlowClientPolicy::DropNewest`].
    Dropped,
    /// Not queued: the queue would have passed its limit. The connection is
    /// now closing with 1013 and everything it had queued was discarded;
    /// `discarded` counts those frames plus the rejected one.
    Overflowed { discarded: usize },
    /// Not queued: the connection is already closing.
    Closed,
}

/// How long [`Turns::wait`] waits without a turn being taken.
const STALL: Duration = Duration::from_millis(10);

/// The turns the writers of a layer owe: a writer woken for data owes one
/// until it takes its queue, so that a task publishing in a loop can wait
/// for the writers it woke ([`Publisher::yield_to_writers`]).
///
/// [`Publisher::yield_to_writers`]: crate::Publisher::yield_to_writers
#[derive(Debug)]
pub(crate) struct Turns {
    owed: AtomicUsize,
    /// Turns taken (or settled when a connection ended), ever.
    taken: AtomicU64,
    /// The smallest `taken` a waiter waits for; `u64::MAX` when none does.
    wanted: AtomicU64,
    reached: Notify,
}

impl Default for Turns {
    fn default() -> Self {
        Self {
            owed: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            wanted: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        }
    }
}

impl Turns {
    fn owe(&self) {
        self.owed.fetch_add(1, Relaxed);
    }

    fn took(&self) {
        self.owed.fetch_sub(1, Relaxed);
        // SeqCst here and in `wait`: each side writes one value and reads
        // the other's, so at least one of them sees the other's write.
        let taken = self.taken.fetch_add(1, SeqCst) + 1;
        if taken >= self.wanted.load(SeqCst) {
            self.reached.notify_waiters();
        }
    }

    /// Waits until as many turns were taken as were owed when called, or
    /// until none has been taken for [`STALL`]; yields once if none was
    /// owed, as a loop that awaits this expects to.
    pub(crate) async fn wait(&self) {
        let owed = self.owed.load(Relaxed) as u64;
        if owed == 0 {
            tokio::task::yield_now().await;
            return;
        }
        let target = self.taken.load(SeqCst) + owed;
        loop {
            let reached = self.reached.notified();
            tokio::pin!(reached);
            reached.as_mut().enable();
            self.wanted.fetch_min(target, SeqCst);
            let taken = self.taken.load(SeqCst);
            if taken >= target {
                break;
            }
            // No turn taken for a while: the writers still owing are not
            // running (a runtime that was shut down dropped their tasks
            // before they could settle), and waiting longer would not help.
            if tokio::time::timeout(STALL, reached).await.is_err()
                && self.taken.load(SeqCst) == taken
            {
                break;
            }
        }
        // Done: stop the writers' notifying, and have any other waiter
        // (whose larger target `wanted` may have hidden) put its own back.
        if self
            .wanted
            .compare_exchange(target, u64::MAX, SeqCst, SeqCst)
            .is_ok()
        {
            self.reached.notify_waiters();
        }
    }
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
    pub(crate) fn new(client_id: ClientId, max_bytes: usize, policy: SlowClientPolicy) -> Self {
        Self {
            client_id,
            max_bytes,
            policy,
            state: Mutex::new(State::default()),
            beat: AtomicBool::new(false),
            heard_ms: AtomicU64::new(0),
        }
    }

    /// Records that the client was heard from `ms` after its connection
    /// began.
    pub(crate) fn heard(&self, ms: u64) {
        self.heard_ms.store(ms, Relaxed);
    }

    /// When the client was last heard from (see [`Outbox::heard`]).
    pub(crate) fn last_heard(&self) -> u64 {
        self.heard_ms.load(Relaxed)
    }

    /// A heartbeat: the writer pings the client, or ends a silent one.
    pub(crate) fn beat(&self) {
        self.beat.store(true, Relaxed);
        self.wake(self.lock());
    }

    /// Gives back the room an empty queue grew to. Called once a
    /// heartbeat, not whenever the queue empties: publishers would then
    /// make the room again for nearly every message to a connection that
    /// keeps up.
    pub(crate) fn release_room(&self) {
        let mut state = self.lock();
        if state.data.is_empty() {
            state.data = VecDeque::new();
        }
    }

    /// Whether a heartbeat came since the last call.
    pub(crate) fn take_beat(&self) -> bool {
        self.beat.load(Relaxed) && self.beat.swap(false, Relaxed)
    }

    pub(crate) fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// Queues a message unless that would pass the byte limit; what happens
    /// then is the [`SlowClientPolicy`]'s. A message always fits an empty
    /// queue, so one larger than the limit still reaches a client that
    /// keeps up.
    #[inline]
    pub(crate) fn push(&self, message: Message, turns: &Turns) -> Push {
        let mut state = self.lock();
        if state.closing.is_some() || state.killed {
            return Push::Closed;
        }
        let len = message.len();
        let mut coalesced = 0;
        let coalescing = self.policy == SlowClientPolicy::Coalesce;
        if state.data_bytes > 0 && state.data_bytes + len > self.max_bytes {
            if coalescing {
                coalesced = state.coalesce_all();
            }
            if state.data_bytes > 0 && state.data_bytes + len > self.max_bytes {
                if self.policy == SlowClientPolicy::DropNewest {
                    return Push::Dropped;
                }
                let close =
                    crate::frame::close(crate::close_code::TRY_AGAIN_LATER, "outbound queue full");
                let discarded = state.begin_close(Some(close), false) + 1;
                self.wake(state);
                return Push::Overflowed { discarded };
            }
        }
        let was_empty = state.data.is_empty() && state.control.is_empty();
        let message = if coalescing && state.data_bytes + len > self.max_bytes / 2 {
            match state.merge_into_last(message) {
                Ok(()) => {
                    return Push::Queued {
                        coalesced: coalesced + 1,
                    }
                }
                Err(message) => message,
            }
        } else {
            message
        };
        state.data_bytes += len;
        state.data.push_back(Queued::One(message));
        if was_empty {
            if !std::mem::replace(&mut state.owes_turn, true) {
                turns.owe();
            }
            self.wake(state);
        }
        Push::Queued { coalesced }
    }

    /// Queues a control frame (a pong) ahead of all data.
    pub(crate) fn push_control(&self, frame: Bytes) {
        let mut state = self.lock();
        if state.closing.is_some() || state.killed {
            return;
        }
        state.control.push(frame);
        self.wake(state);
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
        let discarded = state.begin_close(frame, flush);
        self.wake(state);
        discarded
    }

    /// Makes the writer stop at once, abandoning even a write in progress.
    /// Returns how many queued data frames were discarded.
    pub(crate) fn kill(&self) -> usize {
        let mut state = self.lock();
        state.killed = true;
        let discarded = state.discard_data();
        self.wake(state);
        discarded
    }

    /// Takes the queued control frames, and their room with them: a
    /// connection pinged once an interval would otherwise hold it forever.
    pub(crate) fn take_control(&self) -> Vec<Bytes> {
        std::mem::take(&mut self.lock().control)
    }

    /// Moves the data to write next into `batch`: up to
    /// [`MAX_BATCH_BYTES`], at least one message. Takes the writer's turn.
    pub(crate) fn take(&self, batch: &mut Batch, turns: &Turns) -> Take {
        let mut state = self.lock();
        let owed = std::mem::take(&mut state.owes_turn);
        let take = state.take(batch);
        drop(state);
        if owed {
            turns.took();
        }
        take
    }

    /// Everything queued, taken as the writer would, turns aside.
    #[cfg(test)]
    pub(crate) fn take_all(&self) -> Vec<Message> {
        let mut all = Vec::new();
        let mut batch = Batch::default();
        while let Take::Frames { .. } = self.take(&mut batch, &Turns::default()) {
            all.extend(batch.iter().cloned());
            batch.clear();
        }
        all
    }

    /// Settles a turn the writer owes and will not take: its connection
    /// ended.
    pub(crate) fn settle_turn(&self, turns: &Turns) {
        if std::mem::take(&mut self.lock().owes_turn) {
            turns.took();
        }
    }

    /// How many more bytes of data the queue takes before it is full.
    pub(crate) fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.lock().data_bytes)
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

    /// Waits for a wake, or takes one that came while nobody waited.
    /// Cancel-safe: a wake is only taken when this returns.
    pub(crate) fn woken(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_woken(cx))
    }

    /// As [`Outbox::woken`], polled.
    pub(crate) fn poll_woken(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut state = self.lock();
        if std::mem::take(&mut state.woken) {
            return Poll::Ready(());
        }
        match &state.waiter {
            Some(waiter) if waiter.will_wake(cx.waker()) => {}
            _ => state.waiter = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Records a wake and wakes the writer, after the lock is let go.
    fn wake(&self, mut state: std::sync::MutexGuard<'_, State>) {
        state.woken = true;
        let waiter = state.waiter.take();
        drop(state);
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock::lock(&self.state)
    }
}

impl State {
    /// What [`Outbox::take`] takes.
    fn take(&mut self, batch: &mut Batch) -> Take {
        if self.killed || self.close_sent {
            return Take::Stop;
        }
        let data_frames = if batch.is_empty() && self.data_bytes <= MAX_BATCH_BYTES {
            // All of it: the queue becomes the batch, and the batch's room
            // the queue's.
            std::mem::swap(&mut self.data, &mut batch.0);
            self.data_bytes = 0;
            batch.len()
        } else {
            let mut data_frames = 0;
            let mut taken = 0;
            for entry in &self.data {
                if taken >= MAX_BATCH_BYTES {
                    break;
                }
                taken += entry.len();
                data_frames += 1;
            }
            self.data_bytes -= taken;
            batch.0.extend(self.data.drain(..data_frames));
            data_frames
        };
        if self.data.is_empty() && self.data.capacity() > KEEP_CAPACITY {
            self.data = VecDeque::new();
        }
        if data_frames > 0 {
            return Take::Frames { data_frames };
        }
        match &mut self.closing {
            None => Take::Idle,
            Some(closing) => {
                self.close_sent = true;
                match closing.frame.take() {
                    Some(frame) => Take::Close(frame),
                    None => Take::Stop,
                }
            }
        }
    }

    /// Starts closing with `frame` last, discarding the queued data unless
    /// `flush`; returns how many messages were discarded.
    fn begin_close(&mut self, frame: Option<Bytes>, flush: bool) -> usize {
        self.closing = Some(Box::new(Closing { frame }));
        if flush {
            0
        } else {
            self.discard_data()
        }
    }

    /// Empties the data queue; returns how many messages it held.
    fn discard_data(&mut self) -> usize {
        self.data_bytes = 0;
        std::mem::take(&mut self.data).len()
    }

    /// Merges `message` into the last queued entry if both are deltas of
    /// one topic.
    fn merge_into_last(&mut self, message: Message) -> Result<(), Message> {
        let Some(last) = self.data.back_mut() else {
            return Err(message);
        };
        let before = last.len();
        last.merge(message)?;
        self.data_bytes = self.data_bytes - before + last.len();
        Ok(())
    }

    /// Merges every run of consecutive same-topic deltas; returns how many
    /// deltas were merged into others.
    fn coalesce_all(&mut self) -> usize {
        let mut merged = 0;
        let mut out: VecDeque<Queued> = VecDeque::with_capacity(self.data.len());
        let mut bytes = 0;
        for entry in self.data.drain(..) {
            let entry = match (out.back_mut(), entry) {
                (Some(last), Queued::One(message)) => match last.merge(message) {
                    Ok(()) => {
                        merged += 1;
                        continue;
                    }
                    Err(message) => Queued::One(message),
                },
                (_, entry) => entry,
            };
            out.push_back(entry);
        }
        for entry in &out {
            bytes += entry.len();
        }
        self.data = out;
        self.data_bytes = bytes;
        merged
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

    /// For tests that do not look at turns.
    static NO_TURNS: std::sync::LazyLock<Turns> = std::sync::LazyLock::new(Turns::default);
    use crate::message::Draft;

    fn outbox(max: usize) -> Outbox {
        Outbox::new(ClientId::next(), max, SlowClientPolicy::Close)
    }

    fn plain(bytes: &'static [u8]) -> Message {
        Message::plain(Bytes::from_static(bytes))
    }

    #[test]
    fn control_frames_are_taken_apart_from_data() {
        let o = outbox(100);
        assert_eq!(
            o.push(plain(b"d1"), &NO_TURNS),
            Push::Queued { coalesced: 0 }
        );
        o.push_control(Bytes::from_static(b"c1"));
        assert_eq!(o.take_control(), [&b"c1"[..]]);
        let mut batch = Batch::default();
        assert_eq!(
            o.take(&mut batch, &NO_TURNS),
            Take::Frames { data_frames: 1 }
        );
        assert_eq!(batch[0].frame(), &b"d1"[..]);
        batch.clear();
        assert_eq!(o.take(&mut batch, &NO_TURNS), Take::Idle);
    }

    #[test]
    fn batches_are_bounded() {
        let o = outbox(1 << 20);
        let big = Bytes::from(vec![0u8; MAX_BATCH_BYTES / 2]);
        for _ in 0..3 {
            o.push(Message::plain(big.clone()), &NO_TURNS);
        }
        let mut batch = Batch::default();
        assert_eq!(
            o.take(&mut batch, &NO_TURNS),
            Take::Frames { data_frames: 2 }
        );
        batch.clear();
        assert_eq!(
            o.take(&mut batch, &NO_TURNS),
            Take::Frames { data_frames: 1 }
        );
    }

    #[test]
    fn a_take_hands_over_the_whole_queue_or_appends_in_order() {
        let o = outbox(100);
        for frame in [b"a", b"b"] {
            o.push(plain(frame), &NO_TURNS);
        }
        let mut batch = Batch::default();
        assert_eq!(
            o.take(&mut batch, &NO_TURNS),
            Take::Frames { data_frames: 2 }
        );
        // Its bytes left with it: the queue has all its room again.
        assert_eq!(o.room(), 100);
        o.push(plain(b"c"), &NO_TURNS);
        // Into a batch that still holds frames, the next ones go after them.
        assert_eq!(
            o.take(&mut batch, &NO_TURNS),
            Take::Frames { data_frames: 1 }
        );
        let frames: Vec<&[u8]> = batch.iter().map(|m| &m.frame()[..]).collect();
        assert_eq!(frames, [&b"a"[..], b"b", b"c"]);
        assert_eq!(o.room(), 100);
    }

    #[test]
    fn overflow_discards_the_queue_and_closes_with_1013() {
        let o = outbox(10);
        assert_eq!(
            o.push(plain(b"123456"), &NO_TURNS),
            Push::Queued { coalesced: 0 }
        );
        assert_eq!(
            o.push(plain(b"123456"), &NO_TURNS),
            Push::Overflowed { discarded: 2 }
        );
        assert_eq!(o.push(plain(b"1"), &NO_TURNS), Push::Closed);
        let mut batch = Batch::default();
        match o.take(&mut batch, &NO_TURNS) {
            Take::Close(frame) => assert_eq!(&frame[2..4], &1013u16.to_be_bytes()),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(o.take(&mut batch, &NO_TURNS), Take::Stop);
    }

    #[test]
    fn drop_newest_keeps_the_connection() {
        let o = Outbox::new(ClientId::next(), 10, SlowClientPolicy::DropNewest);
        assert_eq!(
            o.push(plain(b"123456"), &NO_TURNS),
            Push::Queued { coalesced: 0 }
        );
        assert_eq!(o.push(plain(b"123456"), &NO_TURNS), Push::Dropped);
        assert_eq!(o.status(), Status::Open);
    }

    #[test]
    fn coalescing_merges_deltas_of_one_topic_and_keeps_every_byte() {
        let o = Outbox::new(ClientId::next(), 1000, SlowClientPolicy::Coalesce);
        let mut seq = 0;
        let mut delta = |topic: &str, text: &str| {
            seq += 1;
            Draft::delta(topic, text).seal(seq)
        };
        let mut coalesced = 0;
        let mut expected = String::new();
        for i in 0..40 {
            let text = format!("{i},");
            expected.push_str(&text);
            match o.push(delta("a", &text), &NO_TURNS) {
                Push::Queued { coalesced: n } => coalesced += n,
                other => panic!("{other:?}"),
            }
        }
        assert!(coalesced > 0);
        assert_eq!(o.status(), Status::Open);
        let mut batch = Batch::default();
        o.take(&mut batch, &NO_TURNS);
        let mut text = String::new();
        let mut next_seq = 1;
        for message in batch.iter() {
            let v: serde_json::Value =
                serde_json::from_slice(crate::frame::payload(message.frame())).unwrap();
            let first = v
                .get("seqStart")
                .map_or(v["seq"].as_u64(), |s| s.as_u64())
                .unwrap();
            assert_eq!(first, next_seq);
            next_seq = v["seq"].as_u64().unwrap() + 1;
            text.push_str(v["text"].as_str().unwrap());
        }
        assert_eq!(text, expected);
        assert_eq!(next_seq, 41);
        assert_eq!(batch.len() + coalesced, 40);
    }

    #[test]
    fn one_large_frame_fits_an_empty_queue() {
        let o = outbox(4);
        assert_eq!(
            o.push(plain(b"123456789"), &NO_TURNS),
            Push::Queued { coalesced: 0 }
        );
    }

    #[test]
    fn flushing_close_writes_queued_data_first() {
        let o = outbox(100);
        o.push(plain(b"d1"), &NO_TURNS);
        assert_eq!(o.close(Some(Bytes::from_static(b"bye")), true), 0);
        let mut batch = Batch::default();
        assert_eq!(
            o.take(&mut batch, &NO_TURNS),
            Take::Frames { data_frames: 1 }
        );
        batch.clear();
        assert_eq!(
            o.take(&mut batch, &NO_TURNS),
            Take::Close(Bytes::from_static(b"bye"))
        );
    }

    #[test]
    fn kill_stops_the_writer() {
        let o = outbox(100);
        o.push(plain(b"d1"), &NO_TURNS);
        assert_eq!(o.kill(), 1);
        assert_eq!(o.status(), Status::Killed);
        assert_eq!(o.take(&mut Batch::default(), &NO_TURNS), Take::Stop);
    }

    #[test]
    fn a_writer_woken_for_data_owes_one_turn_until_it_takes() {
        let turns = Turns::default();
        let o = outbox(100);
        o.push(plain(b"d1"), &turns);
        o.push(plain(b"d2"), &turns);
        assert_eq!(turns.owed.load(Relaxed), 1);
        // Other wakes owe nothing.
        o.push_control(Bytes::from_static(b"pong"));
        o.beat();
        assert_eq!(turns.owed.load(Relaxed), 1);
        o.take(&mut Batch::default(), &turns);
        o.take_control();
        assert_eq!(turns.owed.load(Relaxed), 0);
        assert_eq!(turns.taken.load(Relaxed), 1);
        // A take without a wake for data is no turn.
        o.take(&mut Batch::default(), &turns);
        assert_eq!(turns.taken.load(Relaxed), 1);
        // A connection that ends settles what its writer owed.
        o.push(plain(b"d3"), &turns);
        assert_eq!(turns.owed.load(Relaxed), 1);
        o.settle_turn(&turns);
        o.settle_turn(&turns);
        assert_eq!(turns.owed.load(Relaxed), 0);
        assert_eq!(turns.taken.load(Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_turns_ends_once_the_owed_ones_are_taken() {
        let turns = std::sync::Arc::new(Turns::default());
        // Nothing owed: at once.
        turns.wait().await;
        let (a, b, c) = (outbox(100), outbox(100), outbox(100));
        a.push(plain(b"a"), &turns);
        b.push(plain(b"b"), &turns);
        let first = tokio::spawn({
            let turns = turns.clone();
            async move { turns.wait().await }
        });
        tokio::task::yield_now().await;
        // A turn owed after the first wait began counts for the second.
        c.push(plain(b"c"), &turns);
        let second = tokio::spawn({
            let turns = turns.clone();
            async move { turns.wait().await }
        });
        tokio::task::yield_now().await;
        a.take(&mut Batch::default(), &turns);
        tokio::task::yield_now().await;
        assert!(!first.is_finished() && !second.is_finished());
        b.take(&mut Batch::default(), &turns);
        first.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        c.take(&mut Batch::default(), &turns);
        second.await.unwrap();
        assert_eq!(turns.wanted.load(Relaxed), u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_turns_that_never_come_ends_once_nothing_moves() {
        let turns = Turns::default();
        let o = outbox(100);
        o.push(plain(b"a"), &turns);
        let start = tokio::time::Instant::now();
        turns.wait().await;
        assert_eq!(start.elapsed(), STALL);
    }
}
