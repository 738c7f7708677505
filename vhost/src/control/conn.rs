//! One control connection: bytes in, request lines out to the handler, responses back.
//!
//! The socket is non-blocking and the event loop level-triggered. A connection either waits
//! to read or waits to write, never both: while responses are queued it reads nothing more,
//! so a client that sends requests without reading answers cannot make the daemon buffer
//! without bound.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// Requests are not answered while this much output is queued (see the module docs).
const OUT_HIGH_WATER: usize = 256 * 1024;

/// What a connection waits for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    Read,
    Write,
    Close,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub stream: UnixStream,
    /// Bytes received and not yet taken as lines.
    inbuf: Vec<u8>,
    /// Responses not yet sent; `out[sent..]` is pending.
    out: Vec<u8>,
    sent: usize,
    /// No more input will be taken: the peer shut down its side, or the stream is beyond
    /// repair (an overlong line). The connection closes once `out` is sent.
    eof: bool,
    /// The interest registered with the event loop.
    pub interest: Next,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            inbuf: Vec::new(),
            out: Vec::new(),
            sent: 0,
            eof: false,
            interest: Next::Read,
        }
    }

    /// One `read` (the loop is level-triggered and comes back if more is waiting, which keeps
    /// one busy client from starving the others).
    pub fn read_once(&mut self) -> io::Result<()> {
        if self.eof {
            return Ok(());
        }
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Answers complete lines and sends what it can, until output blocks or no complete line
    /// is left. Returns what to wait for next.
    pub fn pump(&mut self, handle: &mut dyn FnMut(&[u8]) -> Vec<u8>) -> io::Result<Next> {
        loop {
            self.take_lines(handle);
            self.flush()?;
            if !self.out.is_empty() || !self.inbuf.contains(&b'\n') {
                break;
            }
        }
        Ok(self.next())
    }

    fn next(&self) -> Next {
        if !self.out.is_empty() {
            Next::Write
        } else if self.eof {
            Next::Close
        } else {
            Next::Read
        }
    }

    fn take_lines(&mut self, handle: &mut dyn FnMut(&[u8]) -> Vec<u8>) {
        let mut start = 0;
        while self.out.len() < OUT_HIGH_WATER {
            let Some(nl) = self.inbuf[start..].iter().position(|&b| b == b'\n') else {
                break;
            };
            let line = &self.inbuf[start..start + nl];
            start += nl + 1;
            if line.len() > MAX_LINE {
                self.overlong();
                return;
            }
            answer(line, &mut self.out, handle);
        }
        self.inbuf.drain(..start);
        if self.inbuf.len() > MAX_LINE && !self.inbuf.contains(&b'\n') {
            self.overlong();
        } else if self.eof && !self.inbuf.contains(&b'\n') && !self.inbuf.is_empty() {
            // The peer shut down its side after a last request without a newline: answer it
            // (`printf '{"cmd":"stat"}' | socat - UNIX:...` works). If the peer is gone
            // altogether, sending fails and the connection closes.
            let line = std::mem::take(&mut self.inbuf);
            answer(&line, &mut self.out, handle);
        }
    }

    /// The input cannot be split into lines any more: answer once, then close.
    fn overlong(&mut self) {
        let msg = format!(
            "{{\"ok\":false,\"error\":\"request line longer than {MAX_LINE} bytes; closing\"}}\n"
        );
        self.out.extend_from_slice(msg.as_bytes());
        self.inbuf = Vec::new();
        self.eof = true;
    }

    /// Sends queued output until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        while self.sent < self.out.len() {
            match send(&self.stream, &self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.sent = 0;
        Ok(())
    }
}

fn answer(line: &[u8], out: &mut Vec<u8>, handle: &mut dyn FnMut(&[u8]) -> Vec<u8>) {
    let line = line.trim_ascii();
    if !line.is_empty() {
        out.extend_from_slice(&handle(line));
    }
}

/// `send` with MSG_NOSIGNAL: a client that went away must give EPIPE, not a SIGPIPE that
/// would kill the daemon if it did not ignore the signal. MSG_DONTWAIT: never block the control
/// thread, even on a socket not yet made non-blocking.
pub(super) fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call, and
    // the fd is owned by `stream`, which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    fn pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Conn::new(a), b)
    }

    /// Echoes each line back in brackets.
    fn echo(line: &[u8]) -> Vec<u8> {
        let mut v = b"[".to_vec();
        v.extend_from_slice(line);
        v.extend_from_slice(b"]\n");
        v
    }

    fn drive(conn: &mut Conn) -> Next {
        conn.read_once().unwrap();
        conn.pump(&mut echo).unwrap()
    }

    #[test]
    fn partial_lines_and_several_per_read() {
        let (mut conn, mut peer) = pair();
        peer.write_all(b"a\nbb\nc").unwrap();
        assert_eq!(drive(&mut conn), Next::Read);
        peer.write_all(b"cc\r\n\n  \nd\n").unwrap();
        assert_eq!(drive(&mut conn), Next::Read);
        let mut r = BufReader::new(peer.try_clone().unwrap());
        let lines: Vec<String> = (0..4)
            .map(|_| {
                let mut s = String::new();
                r.read_line(&mut s).unwrap();
                s
            })
            .collect();
        assert_eq!(lines, ["[a]\n", "[bb]\n", "[ccc]\n", "[d]\n"]);
    }

    #[test]
    fn last_line_without_newline_is_answered_at_eof() {
        let (mut conn, mut peer) = pair();
        peer.write_all(b"x\ny").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(drive(&mut conn), Next::Read);
        // The EOF comes with the next read.
        assert_eq!(drive(&mut conn), Next::Close);
        drop(conn);
        let mut s = String::new();
        peer.read_to_string(&mut s).unwrap();
        assert_eq!(s, "[x]\n[y]\n");
    }

    #[test]
    fn overlong_line_is_refused_and_closes() {
        let (mut conn, mut peer) = pair();
        let writer = std::thread::spawn(move || {
            // The peer may see EPIPE once the connection closes; that is fine.
            let _ = peer.write_all(&vec![b'x'; MAX_LINE + 10]);
            peer
        });
        let mut next = Next::Read;
        for _ in 0..1000 {
            next = drive(&mut conn);
            if next != Next::Read {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(next, Next::Close);
        drop(conn);
        let mut peer = writer.join().unwrap();
        let mut s = String::new();
        peer.read_to_string(&mut s).unwrap();
        assert!(s.contains("longer than 65536"), "{s}");
    }

    #[test]
    fn stops_answering_while_output_is_blocked() {
        let (mut conn, mut peer) = pair();
        // Big answers, never read by the peer: the connection must turn to Write and keep the
        // rest of the requests unanswered.
        let mut big = |_: &[u8]| vec![b'y'; 64 * 1024];
        let requests = b"q\n".repeat(100);
        peer.write_all(&requests).unwrap();
        conn.read_once().unwrap();
        assert_eq!(conn.pump(&mut big).unwrap(), Next::Write);
        assert!(conn.out.len() - conn.sent <= OUT_HIGH_WATER + 64 * 1024);
        assert!(conn.inbuf.contains(&b'\n'), "requests left for later");
    }
}
