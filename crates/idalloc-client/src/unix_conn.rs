//! A unix stream socket that asks the kernel to report only when it is readable.
//!
//! Why: tokio registers every `UnixStream` with epoll for reading *and* writing.
//! On a unix socket, each message the peer consumes frees space in this side's
//! send buffer, and the kernel (`unix_write_space`) then wakes everything
//! registered for writability on it: every request the daemon reads wakes the
//! client's event loop with an `EPOLLOUT` nobody asked for, and every reply the
//! client reads does the same to the daemon. With one reservation in flight per
//! connection that is one spurious wake-up per message on each side, and in the
//! daemon's profile the wake-ups and the preemptions they caused were about 13 %
//! of its samples (docs/performance.md). Redis's event loop avoids the same by watching a
//! socket for writability only while it has output pending; so does this type.
//!
//! [`UnixConn`] watches its socket for reading only. A write goes straight to the
//! socket; only when the send buffer is full (a write would block, which requests
//! and replies of a few dozen bytes hardly ever meet) is a duplicate of the
//! descriptor registered for writability, and dropped again after the next write
//! that goes through. The byte stream is the socket's: nothing here frames or
//! buffers.
//!
//! Invariant protected: none of the id invariants; this only changes which
//! readiness events the process is woken for. What it must not do, and its tests
//! check: lose a wake-up (a reader or a blocked writer that never resumes), or
//! reorder or drop bytes.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected unix stream registered for readability only (see the module docs).
/// [`UnixConn::split`] gives a read half and a write half that may be used from
/// two tasks.
#[derive(Debug)]
pub struct UnixConn {
    fd: Arc<AsyncFd<StdUnixStream>>,
    /// A duplicate of the descriptor registered for writability, only while a
    /// write is blocked.
    write_wait: Option<AsyncFd<StdUnixStream>>,
}

impl UnixConn {
    /// Take over a connected tokio stream (it is deregistered from tokio's
    /// read-and-write interest and registered again for reading only). Call inside
    /// a Tokio runtime.
    pub fn from_tokio(stream: tokio::net::UnixStream) -> io::Result<UnixConn> {
        let std = stream.into_std()?;
        std.set_nonblocking(true)?;
        Ok(UnixConn {
            fd: Arc::new(register(std, Interest::READABLE)?),
            write_wait: None,
        })
    }

    /// Connect to the socket at `path`.
    pub async fn connect(path: impl AsRef<std::path::Path>) -> io::Result<UnixConn> {
        UnixConn::from_tokio(tokio::net::UnixStream::connect(path).await?)
    }

    /// Two handles on the one socket: read from the first, write to the second.
    /// Reading from both, or writing to both at once, is not supported (each
    /// direction keeps one waiting task).
    pub fn split(self) -> (UnixConn, UnixConn) {
        let other = UnixConn {
            fd: self.fd.clone(),
            write_wait: None,
        };
        (self, other)
    }
}

/// Register `socket` with the runtime's reactor for `interest` only.
fn register(socket: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the `AsyncFd` owns `socket`, which owns its descriptor: it stays
    // open, and `as_raw_fd` returns that same descriptor, until the `AsyncFd` is
    // dropped.
    Ok(unsafe { AsyncFd::register_with_interest(socket, interest) }?)
}

impl AsyncRead for UnixConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.fd.poll_read_ready(cx))?;
            // Into the buffer's spare capacity as it is, as tokio's own sockets
            // read: a codec hands over KiBs of uninitialised capacity per read, and
            // zeroing it first (`initialize_unfilled`) was 1.6 % of the daemon's
            // samples at 64 clients.
            // SAFETY: recv(2) only writes to the memory it is given; nothing here
            // reads it, and only the `n` bytes it reports are marked initialised.
            let unfilled = unsafe { buf.unfilled_mut() };
            let wanted = unfilled.len();
            let received = ready.try_io(|fd| {
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), wanted, 0) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match received {
                Ok(Ok(n)) => {
                    // A short read drained the receive queue: say so now rather
                    // than learn it from one more read that would block (as tokio's
                    // own sockets do). Data arriving after it is a new event.
                    if n > 0 && n < wanted {
                        ready.clear_ready();
                    }
                    // SAFETY: recv(2) wrote these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: readiness is cleared, wait for the next event.
                Err(_would_block) => continue,
            }
        }
    }
}

impl UnixConn {
    /// Run `write` on the socket; if it would block, wait for writability on a
    /// duplicate descriptor registered just for that, then try again.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&StdUnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.fd.get_ref()) {
                Ok(n) => {
                    self.write_wait = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.write_wait.is_none() {
                        // Registering reports the current state too, so space that
                        // freed up since the failed write is not missed.
                        let dup = self.fd.get_ref().try_clone()?;
                        self.write_wait = Some(register(dup, Interest::WRITABLE)?);
                    }
                    let wait = self.write_wait.as_ref().expect("registered above");
                    let mut ready = ready!(wait.poll_write_ready(cx))?;
                    // Cleared before the retry: space freed after this point is a
                    // new event, so a retry that blocks again still gets woken.
                    ready.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut s| s.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.fd.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (UnixConn, UnixConn) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (
            UnixConn::from_tokio(a).unwrap(),
            UnixConn::from_tokio(b).unwrap(),
        )
    }

    /// Bytes cross in order both ways, and a reader waiting before they are
    /// written is woken.
    #[tokio::test]
    async fn bytes_cross_in_order_and_a_waiting_reader_wakes() {
        let (mut a, b) = pair().await;
        let (mut b_read, mut b_write) = b.split();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 5];
            b_read.read_exact(&mut got).await.unwrap();
            got
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.write_all(b"hello").await.unwrap();
        assert_eq!(reader.await.unwrap(), b"hello");
        b_write.write_all(b"back").await.unwrap();
        let mut got = [0u8; 4];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"back");
    }

    /// A writer that fills the send buffer waits (without spinning and without
    /// losing the wake-up) until the peer reads, and every byte arrives in order.
    #[tokio::test]
    async fn a_writer_blocked_on_a_full_buffer_resumes_and_nothing_is_lost() {
        let (mut a, mut b) = pair().await;
        const TOTAL: usize = 8 << 20; // far past any unix socket buffer
        let writer = tokio::spawn(async move {
            let chunk: Vec<u8> = (0..=255u8).cycle().take(64 << 10).collect();
            let mut sent = 0;
            while sent < TOTAL {
                a.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
            a.shutdown().await.unwrap();
            a
        });
        // Let the writer block on a full buffer before reading anything.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the buffer should have filled");
        let mut got = Vec::with_capacity(TOTAL);
        tokio::time::timeout(Duration::from_secs(20), b.read_to_end(&mut got))
            .await
            .expect("the blocked writer resumed")
            .unwrap();
        assert_eq!(got.len(), TOTAL);
        assert!(got.iter().enumerate().all(|(i, v)| *v == (i % 256) as u8));
        let a = writer.await.unwrap();
        assert!(
            a.write_wait.is_none(),
            "dropped after the write that went through"
        );
    }

    /// The epoll event masks registered for descriptor `fd` in this process, read
    /// from `/proc/self/fdinfo` of every epoll instance (each test's runtime has
    /// its own).
    fn epoll_masks(fd: i32) -> Vec<u32> {
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().contains("eventpoll"));
            if !is_epoll {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            // "tfd:        7 events:       19 data: ..."
            for line in info.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("tfd:") {
                    continue;
                }
                let tfd: i32 = words.next().unwrap().parse().unwrap();
                if tfd == fd && words.next() == Some("events:") {
                    masks.push(u32::from_str_radix(words.next().unwrap(), 16).unwrap());
                }
            }
        }
        masks
    }

    /// What the type is for: the socket is registered for reading and not for
    /// writing, unlike tokio's own `UnixStream` (checked here too, so the test
    /// fails if tokio ever stops registering writability and the type becomes
    /// pointless, and if `UnixConn` registers it).
    #[tokio::test]
    async fn only_readability_is_registered_unlike_tokios_stream() {
        const EPOLLIN: u32 = 0x1;
        const EPOLLOUT: u32 = 0x4;
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let tokio_masks = epoll_masks(a.as_raw_fd());
        assert!(
            tokio_masks.iter().any(|m| m & EPOLLOUT != 0),
            "tokio's stream: {tokio_masks:x?}"
        );
        let (conn, _b) = (UnixConn::from_tokio(a).unwrap(), b);
        // Other tests' runtimes run beside this one and may hold the same
        // descriptor number in their own epoll: every entry must be read-only.
        let masks = epoll_masks(conn.fd.as_raw_fd());
        assert!(!masks.is_empty(), "registered");
        assert!(
            masks.iter().all(|m| m & (EPOLLIN | EPOLLOUT) == EPOLLIN),
            "{masks:x?}"
        );
    }

    /// The peer closing is an end of stream for the reader.
    #[tokio::test]
    async fn the_peer_closing_is_end_of_stream() {
        let (a, mut b) = pair().await;
        drop(a);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }
}
