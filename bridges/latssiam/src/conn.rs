//! A thin connection over any byte stream: frames in, frames out, through
//! [`FrameCodec`]. Client and server sessions are written on top of it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Framed;

use crate::wire::{Block, Code, Frame, FrameCodec, Label, Status, WireError};

/// What reading a frame can end in, besides a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The peer broke the wire rules (or the transport failed).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer closed the stream cleanly between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// Nothing arrived within the allowed time.
    #[error("timed out waiting for the peer")]
    Timeout,
}

/// The longest a hang-up drains what the peer still sends ([`Connection::hang_up`]).
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// A hang-up's drain ends after this long without input.
pub const LINGER_IDLE: Duration = Duration::from_secs(1);
/// The most a hang-up drains.
pub const LINGER_OCTETS: usize = 1 << 20;

/// How long a write may wait for a peer that does not read, unless set otherwise.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Frames over a stream.
///
/// Every write is bounded by a timeout, so a peer that stops reading cannot
/// hold a session (and what it has queued for it) forever; reads take their
/// timeout as an argument.
pub struct Connection<S> {
    framed: Framed<S, FrameCodec>,
    write_timeout: Duration,
}

fn write_timed_out() -> WireError {
    WireError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer does not read"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        Self {
            framed: Framed::with_capacity(stream, FrameCodec::new(), 8 * 1024),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }

    /// Sets the longest a write may take.
    #[must_use]
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }

    /// Reads the next frame, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`ReadError::Closed`] at a clean end of stream, [`ReadError::Timeout`],
    /// or the wire error that the peer caused.
    pub async fn read(&mut self, timeout: Duration) -> Result<Frame, ReadError> {
        match tokio::time::timeout(timeout, self.framed.next()).await {
            Err(_) => Err(ReadError::Timeout),
            Ok(None) => Err(ReadError::Closed),
            Ok(Some(r)) => Ok(r?),
        }
    }

    /// Reads a block with one of the `labels`, or reports what came instead.
    ///
    /// # Errors
    /// As [`Connection::read`]; a frame that is not such a block is returned
    /// as `Ok(Err(frame))` for the caller to answer.
    pub async fn read_block(&mut self, labels: &[Label], timeout: Duration) -> Result<Result<Block, Frame>, ReadError> {
        Ok(match self.read(timeout).await? {
            Frame::Block(b) if labels.contains(&b.label) => Ok(b),
            other => Err(other),
        })
    }

    /// Queues a frame without flushing.
    ///
    /// # Errors
    /// [`WireError`] if the frame cannot be encoded or written.
    pub async fn feed(&mut self, frame: impl Into<Frame>) -> Result<(), WireError> {
        tokio::time::timeout(self.write_timeout, self.framed.feed(frame.into())).await.map_err(|_| write_timed_out())?
    }

    /// Writes a frame and flushes.
    ///
    /// # Errors
    /// [`WireError`] if the frame cannot be encoded or written.
    pub async fn send(&mut self, frame: impl Into<Frame>) -> Result<(), WireError> {
        tokio::time::timeout(self.write_timeout, self.framed.send(frame.into())).await.map_err(|_| write_timed_out())?
    }

    /// Flushes queued frames.
    ///
    /// # Errors
    /// [`WireError::Io`] if the stream fails.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        tokio::time::timeout(self.write_timeout, SinkExt::<Frame>::flush(&mut self.framed))
            .await
            .map_err(|_| write_timed_out())?
    }

    /// Sends `code` (best effort), closes the stream (TLS close_notify, then
    /// the write side), and drains what the peer still sends before the
    /// caller drops it: a lingering close, as nginx and Apache do.
    ///
    /// Without it, a peer still writing when we hang up (the rest of an
    /// oversized block) leaves unread input here, the kernel answers it with
    /// a reset, and the reset can destroy the status line and the
    /// close_notify in flight. The drain is bounded by [`LINGER_TIME`],
    /// [`LINGER_IDLE`] without input, and [`LINGER_OCTETS`].
    pub async fn hang_up(&mut self, code: Option<Code>) {
        if let Some(code) = code {
            let _ = self.send(Status::of(code)).await;
        }
        self.close().await;
        self.linger().await;
    }

    async fn linger(&mut self) {
        let stream = self.framed.get_mut();
        let mut scratch = vec![0u8; 16 * 1024];
        let mut drained = 0;
        let _ = tokio::time::timeout(LINGER_TIME, async {
            while drained < LINGER_OCTETS {
                match tokio::time::timeout(LINGER_IDLE, stream.read(&mut scratch)).await {
                    Ok(Ok(n)) if n > 0 => drained += n,
                    _ => break,
                }
            }
        })
        .await;
    }

    /// Closes the stream without a status line.
    pub async fn close(&mut self) {
        let _ = self.flush().await;
        let _ = tokio::time::timeout(self.write_timeout, self.framed.get_mut().shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Command;

    #[tokio::test]
    async fn a_peer_that_does_not_read_cannot_hold_a_write() {
        // A pipe of 64 octets whose other end is never read.
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut conn = Connection::new(ours).with_write_timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let mut result = Ok(());
        for _ in 0..1000 {
            result = conn.send(Command::Quit).await;
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
