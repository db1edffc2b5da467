//! A socket read and written from one task, without an allocation.
//!
//! `tokio::io::split` puts the stream behind an `Arc` so that its halves
//! can go to different tasks: 80 bytes on the heap per connection. A
//! connection's reader and writer are polled by the same task, so the
//! stream stays in that task's state and both halves borrow it. The lock
//! is never contended; it makes the halves `Send`, as the task must be.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One half of a stream shared by a task's reader and writer; either
/// reads or writes.
pub(crate) struct Half<'a, S>(&'a Mutex<S>);

impl<'a, S> Half<'a, S> {
    /// The two halves of `stream`.
    pub(crate) fn pair(stream: &'a Mutex<S>) -> (Self, Self) {
        (Self(stream), Self(stream))
    }

    fn stream(&self) -> MutexGuard<'a, S> {
        // A panic while polling the stream leaves it as usable as any
        // other failed I/O would.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Half<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn both_halves_reach_the_one_stream() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let ours = Mutex::new(ours);
        let (mut read, mut write) = Half::pair(&ours);
        theirs.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        write.write_all(b"pong").await.unwrap();
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }
}
