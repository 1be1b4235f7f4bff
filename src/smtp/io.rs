//! Buffered, line-oriented I/O over a stream that may switch to TLS mid-session.
//!
//! Both sides of the proxy use it: the client session (server role) and the backend
//! connections (client role). Reads are bounded: a line longer than the caller's limit is
//! reported and skipped, never buffered without end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A stream before or after STARTTLS. `Upgrading` only exists for the instant the plain
/// stream is moved into the TLS handshake.
pub enum Conn<S> {
    Plain(S),
    ServerTls(Box<tokio_rustls::server::TlsStream<S>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<S>>),
    Upgrading,
}

impl<S> Conn<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::ServerTls(_) | Conn::ClientTls(_))
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream is being upgraded to TLS",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

/// `timeout` from now; a configured timeout too large to add (someone "turning it off")
/// means a deadline decades away, not a panic.
fn deadline_in(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// What [`LineIo::read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, CRLF included.
    Ok(Vec<u8>),
    /// A line that ends in a bare LF, or holds a CR or NUL before its end.
    BadNewline,
    /// A line longer than the limit (skipped up to its end).
    TooLong,
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("connection closed")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Free room in the read buffer for message content (see [`LineIo::fill_bulk`]).
pub const BULK_SPARE: usize = 16 * 1024;

pub struct LineIo<S> {
    pub conn: Conn<S>,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// The read deadline (see [`LineIo::fill`]); made on the first read.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LineIo<S> {
    pub fn new(conn: Conn<S>) -> Self {
        Self {
            conn,
            // Small to start: most sessions are short commands, and idle ones (floods,
            // slowloris) should cost little. DATA grows the buffer as it needs.
            rbuf: BytesMut::with_capacity(1024),
            wbuf: Vec::new(),
            timer: None,
        }
    }

    /// Bytes received but not consumed yet (pipelined commands).
    pub fn buffered(&self) -> &[u8] {
        &self.rbuf
    }

    pub fn consume(&mut self, n: usize) {
        self.rbuf.advance(n);
    }

    /// Throws away whatever the peer sent ahead: after STARTTLS nothing sent in plaintext
    /// may be taken as if it came over TLS (CVE-2011-0411).
    pub fn discard_buffered(&mut self) -> usize {
        let n = self.rbuf.len();
        self.rbuf.clear();
        n
    }

    /// Reads more bytes into the buffer; `Closed` at EOF.
    pub async fn fill(&mut self, timeout: Duration) -> Result<usize, IoError> {
        if self.rbuf.capacity() - self.rbuf.len() < 512 {
            // A message streams in larger reads; BytesMut reuses the space it consumed.
            let more = if self.rbuf.capacity() >= 16 * 1024 {
                32 * 1024
            } else {
                4096
            };
            self.rbuf.reserve(more);
        }
        // One timer per connection, moved on for each read: a later deadline only updates
        // the entry in place, where a fresh `timeout` per read registered and removed a
        // timer every time (it showed in profiles of the hot path).
        let deadline = deadline_in(timeout);
        let timer = match &mut self.timer {
            Some(t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        let n = tokio::select! {
            biased;
            r = self.conn.read_buf(&mut self.rbuf) => r?,
            () = timer.as_mut() => return Err(IoError::Timeout),
        };
        if n == 0 {
            return Err(IoError::Closed);
        }
        Ok(n)
    }

    /// Reads message content. Leaves room for a whole common message in one read, so that
    /// it goes on to the backends as one write (one segment instead of two or three).
    pub async fn fill_bulk(&mut self, timeout: Duration) -> Result<usize, IoError> {
        if self.rbuf.capacity() - self.rbuf.len() < BULK_SPARE {
            self.rbuf.reserve(BULK_SPARE);
        }
        self.fill(timeout).await
    }

    /// Reads one line of at most `max` octets (CRLF included). `timeout` bounds the whole
    /// line, not each read: a client that trickles a byte now and then (slowloris) still
    /// runs out of time.
    pub async fn read_line(&mut self, max: usize, timeout: Duration) -> Result<Line, IoError> {
        let deadline = deadline_in(timeout);
        let mut skipping = false;
        loop {
            if let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                let line = self.rbuf.split_to(pos + 1);
                if skipping || line.len() > max {
                    return Ok(Line::TooLong);
                }
                let body = &line[..line.len() - 1];
                let ok = body.last() == Some(&b'\r')
                    && !body[..body.len() - 1].iter().any(|&b| b == b'\r' || b == 0);
                return Ok(if ok {
                    Line::Ok(line.to_vec())
                } else {
                    Line::BadNewline
                });
            }
            if self.rbuf.len() > max {
                // Too long: drop what we have and keep dropping until the end of the line,
                // so memory stays bounded whatever the peer sends.
                skipping = true;
                self.rbuf.clear();
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(IoError::Timeout);
            }
            self.fill(left).await?;
        }
    }

    pub fn queue(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    pub fn queue_reply(&mut self, r: &super::reply::Reply) {
        r.write_to(&mut self.wbuf);
    }

    pub fn has_queued(&self) -> bool {
        !self.wbuf.is_empty()
    }

    pub async fn flush(&mut self, timeout: Duration) -> Result<(), IoError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        if matches!(self.conn, Conn::Plain(_)) {
            // Nearly always the socket takes the whole write at once: try that first,
            // without arming a timer (one per write showed in profiles of the hot path).
            // TLS keeps its own buffer and needs the flush below.
            let n = std::future::poll_fn(|cx| {
                match Pin::new(&mut self.conn).poll_write(cx, &self.wbuf) {
                    Poll::Pending => Poll::Ready(Ok(0)),
                    done @ Poll::Ready(_) => done,
                }
            })
            .await?;
            self.wbuf.drain(..n);
            if self.wbuf.is_empty() {
                return Ok(());
            }
        }
        let fut = async {
            self.conn.write_all(&self.wbuf).await?;
            self.conn.flush().await
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| IoError::Timeout)??;
        self.wbuf.clear();
        Ok(())
    }

    pub async fn write_now(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), IoError> {
        self.queue(bytes);
        self.flush(timeout).await
    }

    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_strict() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut io = LineIo::new(Conn::Plain(b));
        let long = vec![b'x'; 5000];
        a.write_all(b"EHLO x\r\nNOOP\n").await.unwrap();
        a.write_all(&long).await.unwrap();
        a.write_all(b"\r\nMAIL\rFROM\r\nQUIT\r\n").await.unwrap();
        let t = Duration::from_secs(1);
        assert_eq!(
            io.read_line(1000, t).await.unwrap(),
            Line::Ok(b"EHLO x\r\n".to_vec())
        );
        assert_eq!(io.read_line(1000, t).await.unwrap(), Line::BadNewline);
        assert_eq!(io.read_line(1000, t).await.unwrap(), Line::TooLong);
        assert_eq!(io.read_line(1000, t).await.unwrap(), Line::BadNewline);
        assert_eq!(
            io.read_line(1000, t).await.unwrap(),
            Line::Ok(b"QUIT\r\n".to_vec())
        );
        drop(a);
        assert!(matches!(io.read_line(1000, t).await, Err(IoError::Closed)));
    }
}
