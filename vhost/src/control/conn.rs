//! One control connection, on its own thread: request lines in, one answer line each out.
//!
//! Blocking I/O with deadlines: a client must complete a request within the idle timeout of
//! connecting or of its last answer, and take each answer within the write timeout; otherwise
//! the connection closes. While an answer is being sent nothing more is read, so a client that
//! sends requests without reading answers cannot make the daemon buffer without bound.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// A connection's deadlines.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// From connecting, or from the last answer, to the end of the next request line.
    pub idle: Duration,
    /// For each answer to be taken.
    pub write: Duration,
}

/// Serves one connection until the client closes it, breaks a limit, or `stream` is shut
/// down from outside. `handle` answers one request line (trimmed, never empty) with one
/// response line, newline included.
pub(super) fn serve(
    stream: &UnixStream,
    limits: Limits,
    handle: &mut dyn FnMut(&[u8]) -> Vec<u8>,
) -> io::Result<()> {
    stream.set_write_timeout(Some(limits.write.max(Duration::from_millis(1))))?;
    let mut inbuf = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut deadline = Instant::now() + limits.idle;
    loop {
        let mut start = 0;
        while let Some(nl) = inbuf[start..].iter().position(|&b| b == b'\n') {
            let line = &inbuf[start..start + nl];
            start += nl + 1;
            if line.len() > MAX_LINE {
                return overlong(stream);
            }
            answer(stream, line, handle)?;
            deadline = Instant::now() + limits.idle;
        }
        inbuf.drain(..start);
        if inbuf.len() > MAX_LINE {
            return overlong(stream);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let msg = format!(
                "{{\"ok\":false,\"error\":\"no complete request for {} s; closing\"}}\n",
                limits.idle.as_secs_f64()
            );
            // Best effort: the client may not be reading.
            let _ = send(stream, msg.as_bytes(), libc::MSG_DONTWAIT);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle client closed",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match (&*stream).read(&mut buf) {
            Ok(0) => {
                // The client shut down its side after a last request without a newline:
                // answer it (`printf '{"cmd":"stat"}' | socat - UNIX:...` works).
                return answer(stream, &inbuf, handle);
            }
            Ok(n) => inbuf.extend_from_slice(&buf[..n]),
            // A timeout comes back as WouldBlock; the deadline check above ends it.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn answer(
    stream: &UnixStream,
    line: &[u8],
    handle: &mut dyn FnMut(&[u8]) -> Vec<u8>,
) -> io::Result<()> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(());
    }
    write_all(stream, &handle(line))
}

/// The input cannot be split into lines any more: answer once, then close.
fn overlong(stream: &UnixStream) -> io::Result<()> {
    let msg = format!(
        "{{\"ok\":false,\"error\":\"request line longer than {MAX_LINE} bytes; closing\"}}\n"
    );
    write_all(stream, msg.as_bytes())
}

/// Sends all of `buf`, within the socket's write timeout.
fn write_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match send(stream, buf, 0) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `send` with MSG_NOSIGNAL (and `flags`): a client that went away must give EPIPE, not a
/// SIGPIPE that would kill the daemon if it did not ignore the signal.
pub(super) fn send(stream: &UnixStream, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call, and
    // the fd is owned by `stream`, which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | flags,
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

    const LONG: Limits = Limits {
        idle: Duration::from_secs(60),
        write: Duration::from_secs(60),
    };

    /// Echoes each line back in brackets.
    fn echo(line: &[u8]) -> Vec<u8> {
        let mut v = b"[".to_vec();
        v.extend_from_slice(line);
        v.extend_from_slice(b"]\n");
        v
    }

    /// Serves one end of a pair on a thread; the other end is returned.
    fn served(limits: Limits) -> (UnixStream, std::thread::JoinHandle<io::Result<()>>) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let t = std::thread::spawn(move || serve(&a, limits, &mut echo));
        (b, t)
    }

    #[test]
    fn partial_lines_several_per_write_and_a_last_line_at_eof() {
        let (mut peer, t) = served(LONG);
        peer.write_all(b"a\nbb\nc").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        peer.write_all(b"cc\r\n\n  \nd\ne").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut s = String::new();
        peer.read_to_string(&mut s).unwrap();
        assert_eq!(s, "[a]\n[bb]\n[ccc]\n[d]\n[e]\n");
        t.join().unwrap().unwrap();
    }

    #[test]
    fn overlong_line_is_refused_and_closes() {
        let (mut peer, t) = served(LONG);
        // The peer may see EPIPE once the connection closes; that is fine.
        let _ = peer.write_all(&vec![b'x'; MAX_LINE + 10]);
        let mut s = String::new();
        let _ = peer.read_to_string(&mut s);
        assert!(s.contains("longer than 65536"), "{s}");
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_stalled_partial_line_is_closed_at_the_idle_deadline() {
        let limits = Limits {
            idle: Duration::from_millis(300),
            ..LONG
        };
        let (mut peer, t) = served(limits);
        let start = Instant::now();
        // Answered requests move the deadline; dribbling a partial line does not.
        peer.write_all(b"a\n").unwrap();
        let mut r = BufReader::new(peer.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "[a]\n");
        for _ in 0..20 {
            if peer.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let e = t.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("no complete request for 0.3 s"), "{line}");
    }

    #[test]
    fn a_client_that_does_not_read_is_closed_at_the_write_deadline() {
        let limits = Limits {
            write: Duration::from_millis(200),
            ..LONG
        };
        let (a, peer) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let t =
            std::thread::spawn(move || serve(&a, limits, &mut |_: &[u8]| vec![b'y'; 64 * 1024]));
        // Requests whose answers fill every buffer; none is read.
        let mut w = peer.try_clone().unwrap();
        let _ = w.write_all(&b"q\n".repeat(1000));
        let e = t.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
