//! The frames a connection's writer has taken and is writing.
//!
//! Writes go out one vectored system call at a time, so between two calls
//! the writer can look at its outbox again. When a call ends on a frame
//! boundary, control frames (pongs, pings) can be put in front of the data
//! still waiting here: a slow reader gets its pings after the frame being
//! written, not after everything taken.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// At most this many frames per system call.
const MAX_SLICES: usize = 64;

#[derive(Default)]
pub(crate) struct Pending {
    frames: VecDeque<Bytes>,
    /// Whether the first frame is partly written.
    partial: bool,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether frames can be put in front now (no frame is half written).
    pub(crate) fn at_boundary(&self) -> bool {
        !self.partial
    }

    /// Puts `frames` in front, in their order. Only at a boundary.
    pub(crate) fn prepend(&mut self, frames: impl DoubleEndedIterator<Item = Bytes>) {
        debug_assert!(self.at_boundary());
        for frame in frames.rev() {
            self.frames.push_front(frame);
        }
    }

    /// One vectored write of the frames' bytes; returns how many bytes the
    /// socket took. Cancel-safe: until it completes, nothing was written.
    pub(crate) async fn write_some<W: AsyncWrite + Unpin>(
        &self,
        io: &mut W,
    ) -> std::io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        for (slice, frame) in slices.iter_mut().zip(&self.frames) {
            *slice = IoSlice::new(frame);
            count += 1;
        }
        let written = io.write_vectored(&slices[..count]).await?;
        if written == 0 && count > 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(written)
    }

    /// Drops `written` bytes from the front.
    pub(crate) fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(frame) = self.frames.front_mut() else {
                return;
            };
            if written >= frame.len() {
                written -= frame.len();
                self.frames.pop_front();
                self.partial = false;
            } else {
                frame.advance(written);
                self.partial = true;
                written = 0;
            }
        }
    }
}

impl Extend<Bytes> for Pending {
    fn extend<I: IntoIterator<Item = Bytes>>(&mut self, frames: I) {
        self.frames.extend(frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn short_writes_lose_nothing_and_control_frames_go_in_at_boundaries() {
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut pending = Pending::default();
        pending.extend((0..20u8).map(|i| Bytes::from(vec![i; 5])));
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
            let n = pending.write_some(&mut a).await.unwrap();
            pending.advance(n);
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
}
