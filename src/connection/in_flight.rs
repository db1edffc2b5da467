//! The frames a connection's writer has taken and is writing.
//!
//! Writes go out one system call at a time, so between two calls the
//! writer can look at its outbox again. When a call ends on a frame
//! boundary, control frames (pongs, pings) can be put in front of the data
//! still waiting here: a slow reader gets its pings after the frame being
//! written, not after everything taken.
//!
//! Small frames are copied together into one buffer per worker thread and
//! written with one plain write; larger ones go out as they are, in one
//! vectored write. The kernel copies a vectored write segment by segment,
//! so for frames of about a hundred bytes one copy here and one plain
//! write cost less (measured in BENCHMARKS.md).

use std::cell::RefCell;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;

use super::outbox::Batch;
use crate::frame::deflate::Deflate;
use crate::message::Message;

/// At most this many frames per vectored write.
const MAX_SLICES: usize = 64;
/// Frames shorter than this are copied into the packing buffer.
const PACK_BELOW: usize = 2048;
/// The most bytes packed into one write.
const PACK_BYTES: usize = 64 << 10;

thread_local! {
    /// Reused by every writer on this thread; it holds bytes only for the
    /// duration of one `poll_write`.
    static PACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The frames being written. Each method that looks at their bytes takes
/// what the connection negotiated (`deflate`: its messages go out
/// compressed); it is not kept here, as this is part of every connection's
/// task and the connection has it already.
#[derive(Default)]
pub(crate) struct InFlight {
    frames: Batch,
    /// How much of the first frame is written.
    written: usize,
}

impl InFlight {
    /// Gives back the room of frames written. Called once a heartbeat, as
    /// the outbox gives back its own: a take of a whole queue trades this
    /// room for the queue's, so keeping it spares the next pushes from
    /// making room again.
    pub(crate) fn release(&mut self) {
        self.frames.release();
    }

    /// Where the outbox puts the frames taken; only while nothing is in
    /// flight.
    pub(crate) fn batch(&mut self) -> &mut Batch {
        debug_assert!(self.frames.is_empty());
        &mut self.frames
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether frames can be put in front now (no frame is half written).
    pub(crate) fn at_boundary(&self) -> bool {
        self.written == 0
    }

    /// Puts `frames` in front, in their order. Only at a boundary.
    pub(crate) fn prepend(&mut self, frames: impl DoubleEndedIterator<Item = Bytes>) {
        debug_assert!(self.at_boundary());
        for frame in frames.rev() {
            self.frames.push_front(Message::plain(frame));
        }
    }

    /// The frames' bytes still to write, in order.
    fn unwritten(&self, deflate: Option<Deflate>) -> impl Iterator<Item = &[u8]> {
        let mut skip = self.written;
        self.frames.iter().map(move |m| {
            let frame = &m.wire(deflate)[skip..];
            skip = 0;
            frame
        })
    }

    /// Polls one write of the frames' bytes; returns how many bytes the
    /// socket took. Until it is ready, nothing was written.
    pub(crate) fn poll_write_some<W: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        io: &mut W,
        deflate: Option<Deflate>,
    ) -> Poll<std::io::Result<usize>> {
        let Some(first) = self.unwritten(deflate).next() else {
            return Poll::Ready(Ok(0));
        };
        let written = std::task::ready!(if first.len() < PACK_BELOW {
            self.poll_packed(cx, io, deflate)
        } else {
            self.poll_vectored(cx, io, deflate)
        })?;
        if written == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        Poll::Ready(Ok(written))
    }

    /// Copies the leading small frames into the thread's buffer and writes
    /// it. The copy is made again on every poll, as the buffer is shared:
    /// a socket that is not writable costs one wasted copy per wake-up.
    fn poll_packed<W: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        io: &mut W,
        deflate: Option<Deflate>,
    ) -> Poll<std::io::Result<usize>> {
        PACKED.with_borrow_mut(|buf| {
            buf.clear();
            for frame in self.unwritten(deflate) {
                if frame.len() >= PACK_BELOW || buf.len() + frame.len() > PACK_BYTES {
                    break;
                }
                buf.extend_from_slice(frame);
            }
            Pin::new(&mut *io).poll_write(cx, buf)
        })
    }

    /// The slices are made on each poll, on the stack: kept in the future,
    /// their 1 KiB would be part of every connection's task.
    fn poll_vectored<W: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        io: &mut W,
        deflate: Option<Deflate>,
    ) -> Poll<std::io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        for (slice, frame) in slices.iter_mut().zip(self.unwritten(deflate)) {
            *slice = IoSlice::new(frame);
            count += 1;
        }
        Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])
    }

    /// Drops `written` bytes from the front.
    pub(crate) fn advance(&mut self, written: usize, deflate: Option<Deflate>) {
        // The frames written whole are counted, then dropped together.
        let mut left = self.written + written;
        let mut whole = 0;
        for frame in self.frames.iter() {
            let len = frame.wire(deflate).len();
            if left < len {
                break;
            }
            left -= len;
            whole += 1;
        }
        self.frames.drop_front(whole);
        self.written = left;
    }
}

impl Extend<Message> for InFlight {
    fn extend<I: IntoIterator<Item = Message>>(&mut self, messages: I) {
        self.frames.extend(messages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn short_writes_lose_nothing_and_control_frames_go_in_at_boundaries() {
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut pending = InFlight::default();
        pending.extend((0..20u8).map(|i| Message::plain(Bytes::from(vec![i; 5]))));
        let reading = tokio::spawn(async move {
            let mut out = vec![0; 103];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut out)
                .await
                .unwrap();
            out
        });
        let mut control_sent = false;
        while !pending.is_empty() {
            if !control_sent && pending.at_boundary() && pending.frames.len() < 15 {
                pending.prepend([Bytes::from_static(&[0xAA; 3])].into_iter());
                control_sent = true;
            }
            let n = std::future::poll_fn(|cx| pending.poll_write_some(cx, &mut a, None))
                .await
                .unwrap();
            pending.advance(n, None);
        }
        let out = reading.await.unwrap();
        // The control frame sits whole between two data frames.
        let at = out.windows(3).position(|w| w == [0xAA; 3]).unwrap();
        assert_eq!(at % 5, 0);
        let mut data = out.clone();
        data.drain(at..at + 3);
        let expected: Vec<u8> = (0..20u8).flat_map(|i| [i; 5]).collect();
        assert_eq!(data, expected);
    }

    #[tokio::test]
    async fn small_and_large_frames_arrive_whole_and_in_order() {
        let (mut a, mut b) = tokio::io::duplex(1000);
        let mut pending = InFlight::default();
        let frames: Vec<Message> = (0..40u8)
            .map(|i| {
                let len = if i % 7 == 3 { PACK_BELOW + 500 } else { 90 };
                Message::plain(Bytes::from(vec![i; len]))
            })
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|m| m.frame().to_vec()).collect();
        pending.extend(frames);
        let total = expected.len();
        let reading = tokio::spawn(async move {
            let mut out = vec![0; total];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut out)
                .await
                .unwrap();
            out
        });
        while !pending.is_empty() {
            let n = std::future::poll_fn(|cx| pending.poll_write_some(cx, &mut a, None))
                .await
                .unwrap();
            pending.advance(n, None);
        }
        assert_eq!(reading.await.unwrap(), expected);
    }
}
