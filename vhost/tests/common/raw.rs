//! A vhost-user frontend written by hand, for tests that must deviate from the protocol at
//! one chosen point: headers, payloads and `SCM_RIGHTS` fds are put on the socket exactly as
//! given, replies are read with a timeout (`SO_RCVTIMEO`), and the normal negotiation is a set
//! of small steps a test can stop, skip or replace.
//!
//! Included with `#[path]` by the test binaries that use it (hostile, churn), so that the other
//! test binaries sharing `common` do not compile it.
#![allow(dead_code)]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vufront::GuestMem;

/// Frontend request codes (vhost-user spec, "Front-end message types").
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Protocol feature bits.
pub mod proto {
    pub const MQ: u64 = 1 << 0;
    pub const LOG_SHMFD: u64 = 1 << 1;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const RESET_DEVICE: u64 = 1 << 13;
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
    /// What a well-behaved frontend asks for (vzram offers all of these).
    pub const WANTED: u64 = MQ | REPLY_ACK | CONFIG | RESET_DEVICE | CONFIGURE_MEM_SLOTS;
}

/// Header flags: protocol version 1, the reply bit, and "please acknowledge".
pub const VERSION: u32 = 0x1;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;
/// In a vring fd message's u64: no fd attached (polling mode).
pub const VRING_NOFD: u64 = 1 << 8;
/// Header length.
pub const HDR: usize = 12;

/// What the backend did in answer to a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A reply: its request code, flags and body.
    Reply {
        code: u32,
        flags: u32,
        body: Vec<u8>,
    },
    /// The backend closed the connection (EOF, ECONNRESET, or EPIPE on send).
    Closed,
    /// Nothing within the read timeout.
    Timeout,
    /// A virtio-blk request completed with this status byte (for I/O cases).
    Used(u8),
}

impl Outcome {
    /// The u64 of a reply with an 8-byte body (an ack: 0 = success).
    pub fn ack(&self) -> Option<u64> {
        match self {
            Outcome::Reply { body, .. } if body.len() == 8 => {
                Some(u64::from_le_bytes(body[..8].try_into().unwrap()))
            }
            _ => None,
        }
    }

    /// An error reply: an ack with a non-zero value.
    pub fn is_nack(&self) -> bool {
        self.ack().is_some_and(|v| v != 0)
    }

    /// A success ack.
    pub fn is_ack(&self) -> bool {
        self.ack() == Some(0)
    }

    pub fn describe(&self) -> String {
        match self {
            Outcome::Reply { code, body, .. } if is_get(*code) && body.len() == 8 => {
                format!("reply {:#x}", self.ack().unwrap())
            }
            Outcome::Reply { code, flags, body } => match self.ack() {
                Some(0) => "ack 0 (accepted)".into(),
                Some(v) => format!("error reply {v:#x}"),
                None => format!(
                    "reply code {code} flags {flags:#x} with {} body bytes",
                    body.len()
                ),
            },
            Outcome::Closed => "connection closed by the daemon".into(),
            Outcome::Timeout => "no reply (timeout)".into(),
            Outcome::Used(s) => format!("request completed with status {s}"),
        }
    }
}

/// Requests whose reply is a value of their own rather than an ack.
fn is_get(code: u32) -> bool {
    matches!(
        code,
        req::GET_FEATURES
            | req::GET_VRING_BASE
            | req::GET_PROTOCOL_FEATURES
            | req::GET_QUEUE_NUM
            | req::GET_MAX_MEM_SLOTS
    )
}

/// One memory region as `SET_MEM_TABLE` / `ADD_MEM_REG` describe it.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub offset: u64,
    pub fd: RawFd,
}

impl Region {
    pub fn bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.uaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b
    }
}

/// The regions of a vufront guest memory (fds stay owned by `mem`).
pub fn regions_of(mem: &GuestMem) -> Vec<Region> {
    mem.vhost_regions()
        .unwrap()
        .iter()
        .map(|r| Region {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uaddr: r.userspace_addr,
            offset: r.mmap_offset,
            fd: r.mmap_handle,
        })
        .collect()
}

/// `SET_MEM_TABLE` body: count, padding, regions.
pub fn mem_table_body(regions: &[Region]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 32 * regions.len());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        b.extend_from_slice(&r.bytes());
    }
    b
}

/// `ADD_MEM_REG` / `REM_MEM_REG` body: padding, one region.
pub fn single_region_body(r: &Region) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b.extend_from_slice(&r.bytes());
    b
}

/// `struct vhost_vring_state`.
pub fn state(index: u32, num: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&num.to_le_bytes());
    b
}

/// `struct vhost_vring_addr` (host virtual addresses of the frontend).
pub fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64, log: u64) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&flags.to_le_bytes());
    for v in [desc, used, avail, log] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// `GET_CONFIG` / `SET_CONFIG` body: offset, size, flags, payload.
pub fn config(offset: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = offset.to_le_bytes().to_vec();
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

pub fn u64_body(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A header: code, flags, size.
pub fn header(code: u32, flags: u32, size: u32) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..4].copy_from_slice(&code.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> File {
    let name = c"vzram-test-raw";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).unwrap();
    file
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Truncates the file behind `fd` (not owned here) to `len` bytes.
pub fn ftruncate(fd: RawFd, len: u64) {
    // SAFETY: plain syscall on a descriptor the caller keeps open; no memory is passed.
    let rc = unsafe { libc::ftruncate(fd, len as libc::off_t) };
    assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
}

/// A raw vhost-user connection.
#[derive(Debug)]
pub struct Raw {
    pub sock: UnixStream,
}

/// Connects to `path`, retrying while it is missing or refuses, for up to `wait`.
pub fn connect(path: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + wait;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Raw {
    /// Connects; replies are awaited for at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Raw> {
        let sock = connect(path, Duration::from_secs(5))?;
        sock.set_read_timeout(Some(timeout))?;
        Ok(Raw { sock })
    }

    pub fn set_timeout(&self, timeout: Duration) {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
    }

    /// Puts `bytes` on the socket with `fds` attached to the first byte. `Err` means the
    /// backend has closed the connection.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), Outcome> {
        let r = if fds.is_empty() {
            (&self.sock).write_all(bytes).map(|_| bytes.len())
        } else {
            self.sock
                .send_with_fds(&[bytes], fds)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        match r {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => {
                // A partial sendmsg (never for our small messages): send the rest plainly.
                (&self.sock)
                    .write_all(&bytes[n..])
                    .map_err(|_| Outcome::Closed)
            }
            Err(_) => Err(Outcome::Closed),
        }
    }

    /// Sends one message with a correct header (size = body length).
    pub fn send(&self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> Result<(), Outcome> {
        let mut m = header(code, flags, body.len() as u32).to_vec();
        m.extend_from_slice(body);
        self.send_bytes(&m, fds)
    }

    /// Reads one reply (header and body).
    pub fn recv(&self) -> Outcome {
        let mut h = [0u8; HDR];
        if let Err(o) = self.read_exact(&mut h) {
            return o;
        }
        let code = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(h[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if size > 0x1000 {
            return Outcome::Reply {
                code,
                flags,
                body: Vec::new(),
            };
        }
        let mut body = vec![0u8; size as usize];
        if let Err(o) = self.read_exact(&mut body) {
            return o;
        }
        Outcome::Reply { code, flags, body }
    }

    fn read_exact(&self, buf: &mut [u8]) -> Result<(), Outcome> {
        match (&self.sock).read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(Outcome::Timeout)
            }
            Err(_) => Err(Outcome::Closed),
        }
    }

    /// Whether the backend has closed the connection, waiting up to the read timeout
    /// (a reply that arrives meanwhile is read and discarded).
    pub fn closed_by_peer(&self) -> bool {
        loop {
            match self.recv() {
                Outcome::Closed => return true,
                Outcome::Timeout => return false,
                _ => continue,
            }
        }
    }

    /// Sends a message with NEED_REPLY and reads the answer.
    pub fn call(&self, code: u32, body: &[u8], fds: &[RawFd]) -> Outcome {
        match self.send(code, VERSION | NEED_REPLY, body, fds) {
            Ok(()) => self.recv(),
            Err(o) => o,
        }
    }

    /// Sends a message that has a reply of its own (GET_*) and reads it.
    pub fn get(&self, code: u32, body: &[u8]) -> Outcome {
        match self.send(code, VERSION, body, &[]) {
            Ok(()) => self.recv(),
            Err(o) => o,
        }
    }

    /// GET_* returning a u64.
    pub fn get_u64(&self, code: u32) -> Result<u64, String> {
        let o = self.get(code, &[]);
        o.ack()
            .ok_or_else(|| format!("request {code}: {}", o.describe()))
    }

    /// A message that must be accepted (ack 0).
    pub fn ok(&self, what: &str, code: u32, body: &[u8], fds: &[RawFd]) -> Result<(), String> {
        let o = self.call(code, body, fds);
        if o.is_ack() {
            Ok(())
        } else {
            Err(format!("set-up step {what} failed: {}", o.describe()))
        }
    }

    /// SET_OWNER (sent without NEED_REPLY: REPLY_ACK is not negotiated yet).
    pub fn owner(&self) -> Result<(), String> {
        self.send(req::SET_OWNER, VERSION, &[], &[])
            .map_err(|o| format!("SET_OWNER: {}", o.describe()))
    }

    /// GET_PROTOCOL_FEATURES, then SET_PROTOCOL_FEATURES with offered & `want`; returns the
    /// acked set. NEED_REPLY may be used from here on if REPLY_ACK is in it.
    pub fn protocol(&self, want: u64) -> Result<u64, String> {
        let offered = self.get_u64(req::GET_PROTOCOL_FEATURES)?;
        let ack = offered & want;
        self.send(req::SET_PROTOCOL_FEATURES, VERSION, &u64_body(ack), &[])
            .map_err(|o| format!("SET_PROTOCOL_FEATURES: {}", o.describe()))?;
        Ok(ack)
    }

    /// The usual start: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (with REPLY_ACK),
    /// SET_FEATURES with offered & `features` (acked). Returns the features sent.
    pub fn negotiate(&self, features: u64) -> Result<u64, String> {
        self.owner()?;
        let offered = self.get_u64(req::GET_FEATURES)?;
        let p = self.protocol(proto::WANTED)?;
        if p & proto::REPLY_ACK == 0 {
            return Err(format!("REPLY_ACK not offered (protocol features {p:#x})"));
        }
        let f = offered & features;
        self.ok("SET_FEATURES", req::SET_FEATURES, &u64_body(f), &[])?;
        Ok(f)
    }

    /// SET_MEM_TABLE with `regions`, each region's fd attached.
    pub fn mem_table(&self, regions: &[Region]) -> Outcome {
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd).collect();
        self.call(req::SET_MEM_TABLE, &mem_table_body(regions), &fds)
    }

    /// A vring fd message (KICK/CALL/ERR) for `index` with `fd` (None: the NOFD flag).
    pub fn vring_fd(&self, code: u32, index: u8, fd: Option<RawFd>) -> Outcome {
        match fd {
            Some(fd) => self.call(code, &u64_body(u64::from(index)), &[fd]),
            None => self.call(code, &u64_body(u64::from(index) | VRING_NOFD), &[]),
        }
    }

    /// SET_VRING_NUM, _BASE, _ADDR (rings of `q` in `mem`), _CALL (`call`), _KICK (`kick`),
    /// _ENABLE: each must be acked.
    pub fn start_queue(
        &self,
        mem: &GuestMem,
        q: &vufront::Queue,
        call: RawFd,
        kick: RawFd,
    ) -> Result<(), String> {
        let i = u32::from(q.index());
        self.ok(
            "SET_VRING_NUM",
            req::SET_VRING_NUM,
            &state(i, u32::from(q.size())),
            &[],
        )?;
        self.ok("SET_VRING_BASE", req::SET_VRING_BASE, &state(i, 0), &[])?;
        let addr = queue_addr(mem, q);
        self.ok("SET_VRING_ADDR", req::SET_VRING_ADDR, &addr, &[])?;
        let o = self.vring_fd(req::SET_VRING_CALL, i as u8, Some(call));
        if !o.is_ack() {
            return Err(format!("set-up step SET_VRING_CALL: {}", o.describe()));
        }
        let o = self.vring_fd(req::SET_VRING_KICK, i as u8, Some(kick));
        if !o.is_ack() {
            return Err(format!("set-up step SET_VRING_KICK: {}", o.describe()));
        }
        self.ok("SET_VRING_ENABLE", req::SET_VRING_ENABLE, &state(i, 1), &[])
    }
}

/// SET_VRING_ADDR body for `q`'s rings in `mem`.
pub fn queue_addr(mem: &GuestMem, q: &vufront::Queue) -> Vec<u8> {
    vring_addr(
        u32::from(q.index()),
        0,
        mem.host_address(q.desc_table_gpa()).unwrap(),
        mem.host_address(q.used_gpa()).unwrap(),
        mem.host_address(q.avail_gpa()).unwrap(),
        0,
    )
}

/// The raw fd of an eventfd-like object.
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}
