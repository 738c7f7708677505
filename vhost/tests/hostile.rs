//! A hostile frontend against the real daemon (issue #11: a QEMU process is less trusted than
//! the daemon, so nothing one frontend sends may stop another VM's disk).
//!
//! One `vzram serve` child with two devices. Device B serves a well-behaved frontend (vufront)
//! doing verified writes and reads for the whole suite; device A gets one hostile case after
//! another, each written from the vhost-user spec with a hand-made frontend (`common/raw.rs`).
//! After every case: the daemon must still run (not exited, not killed by a signal), a fresh
//! well-behaved connection on A must do a verified 4 KiB write + read, and B must not have seen
//! a single error. Each case also states what the daemon must answer to the offending message:
//!
//! - `Nack`: an error reply (REPLY_ACK negotiated, NEED_REPLY set: a non-zero u64).
//! - `NackOrClose`: an error reply, or the daemon closes the connection: only for messages that
//!   are malformed at the framing level (sizes, fds, version, unknown codes).
//! - `GetRefused`: for a message that has its own reply (GET_*): no answer with data, i.e. the
//!   connection closed or a reply without payload.
//! - `ClosedOrIoErr`: the daemon drops the connection (or the request that touched memory the
//!   frontend took away completes with an error status).
//! - `Answered`: any reply (the message is legal or at least harmless; it must not hang or kill
//!   the connection).
//! - `Ack`: accepted (control cases, and legal values near the invalid ones).
//! - `Survive`: the frontend itself hangs up; only the checks after the case matter.
//!
//! The suite is one test so that B runs across all cases; it prints a table and fails at the
//! end if any case failed.

#[path = "common/proc.rs"]
mod child;
#[path = "common/raw.rs"]
mod raw;

use child::{Daemon, KillOnDrop, TempDir, describe_status, fresh_io, poll_until};
use raw::{Outcome, Raw, Region, proto, req};
use std::any::Any;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vufront::{Desc, Frontend, GuestBuf, GuestMem, Options, Queue, RegionSpec, Request};

/// How long a reply may take.
const T: Duration = Duration::from_secs(2);
/// Features a raw session acknowledges (no EVENT_IDX: every completion signals the call fd).
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const MIB: u64 = 1 << 20;
/// Queues each device offers.
const QUEUES: u32 = 2;
/// The daemon's maximum queue size (its default).
const MAX_QUEUE: u32 = 256;
/// A user address no region of ours uses (the frontend's address space is ours to invent).
const FAKE_UADDR: u64 = 0x7e00_0000_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Nack,
    NackOrClose,
    GetRefused,
    ClosedOrIoErr,
    Answered,
    Ack,
    Survive,
}

impl Expect {
    fn met(self, o: &Outcome) -> bool {
        match self {
            Expect::Nack => o.is_nack(),
            Expect::NackOrClose => o.is_nack() || *o == Outcome::Closed,
            Expect::GetRefused => match o {
                Outcome::Closed => true,
                // GET_CONFIG: header of 12 bytes and no config bytes, or size 0.
                Outcome::Reply { body, .. } => {
                    body.is_empty() || (body.len() == 12 && body[4..8] == [0; 4])
                }
                _ => false,
            },
            Expect::ClosedOrIoErr => {
                *o == Outcome::Closed || matches!(o, Outcome::Used(s) if *s != 0)
            }
            Expect::Answered => matches!(o, Outcome::Reply { .. }),
            Expect::Ack => o.is_ack(),
            Expect::Survive => true,
        }
    }
}

/// What a case can use: the socket of A, a scratch directory, and things to keep alive
/// until the checks after the case are done (e.g. the read end of a pipe nobody reads).
struct Ctx {
    a: PathBuf,
    dir: PathBuf,
    keep: RefCell<Vec<Box<dyn Any>>>,
    notes: RefCell<Vec<String>>,
}

type Run = Box<dyn Fn(&Ctx) -> Result<Outcome, String>>;

struct Case {
    name: String,
    expect: Expect,
    /// Also check that the daemon's fd count is back to where it was once the case's
    /// connection is gone.
    fds_flat: bool,
    run: Run,
}

fn case(
    name: impl Into<String>,
    expect: Expect,
    run: impl Fn(&Ctx) -> Result<Outcome, String> + 'static,
) -> Case {
    Case {
        name: name.into(),
        expect,
        fds_flat: false,
        run: Box::new(run),
    }
}

fn fds_flat(mut c: Case) -> Case {
    c.fds_flat = true;
    c
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

impl Ctx {
    fn note(&self, s: String) {
        self.notes.borrow_mut().push(s);
    }

    fn raw(&self) -> Result<Raw, String> {
        Raw::connect(&self.a, T).map_err(|e| format!("connect: {e}"))
    }

    /// Negotiated (REPLY_ACK on), no memory yet.
    fn negotiated(&self) -> Result<Raw, String> {
        let r = self.raw()?;
        r.negotiate(FEATURES)?;
        Ok(r)
    }

    /// Negotiated, with 1 MiB of guest memory handed over.
    fn ready(&self) -> Result<(Raw, Arc<GuestMem>), String> {
        let r = self.negotiated()?;
        let mem = GuestMem::with_size(MIB).unwrap();
        let o = r.mem_table(&raw::regions_of(&mem));
        if !o.is_ack() {
            return Err(format!("set-up step SET_MEM_TABLE: {}", o.describe()));
        }
        Ok((r, mem))
    }

    /// Ready, with queue 0 set up and enabled.
    fn started(&self) -> Result<(Raw, Arc<GuestMem>, Queue), String> {
        let (r, mem) = self.ready()?;
        let q = Queue::new(&mem, 0, MAX_QUEUE as u16).unwrap();
        r.start_queue(&mem, &q, q.call_fd().as_raw_fd(), q.kick_fd().as_raw_fd())?;
        Ok((r, mem, q))
    }
}

/// Publishes a write request whose data descriptor points at `data_gpa` (which the frontend
/// does not touch) and kicks. Returns the status buffer to read and what must stay allocated.
fn raw_write(
    q: &mut Queue,
    mem: &Arc<GuestMem>,
    sector: u64,
    data_gpa: u64,
    len: u32,
) -> Result<(GuestBuf, GuestBuf), String> {
    let e = |e: vufront::Error| e.to_string();
    let hdr = mem.alloc(16, 16).map_err(e)?;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    hdr.write_at(0, &h).map_err(e)?;
    let status = mem.alloc(1, 1).map_err(e)?;
    status.fill(0xff).map_err(e)?;
    let ids = q.alloc_descs(3).map_err(e)?;
    q.write_desc(ids[0], Desc::readable(hdr.gpa(), 16).then(ids[1]))
        .map_err(e)?;
    q.write_desc(ids[1], Desc::readable(data_gpa, len).then(ids[2]))
        .map_err(e)?;
    q.write_desc(ids[2], Desc::writable(status.gpa(), 1))
        .map_err(e)?;
    q.push_avail(&[ids[0]]).map_err(e)?;
    q.kick().map_err(e)?;
    Ok((hdr, status))
}

/// Waits up to `wait` for either a used element (-> its status) or the daemon hanging up.
fn used_or_closed(r: &Raw, q: &mut Queue, status: &GuestBuf, wait: Duration) -> Outcome {
    r.set_timeout(Duration::from_millis(50));
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Ok(used) = q.poll_used() {
            if !used.is_empty() {
                let mut s = [0u8];
                let _ = status.read_at(0, &mut s);
                return Outcome::Used(s[0]);
            }
        }
        if r.closed_by_peer() {
            return Outcome::Closed;
        }
    }
    Outcome::Timeout
}

// ---- memory-region cases ----

/// After a region the daemon should have refused was accepted: put queue 0's rings at `uaddr`
/// (in the part of the region with no file behind it) and kick, as a hostile frontend would.
fn ring_at(r: &Raw, uaddr: u64) {
    let _ = r.call(req::SET_VRING_NUM, &raw::state(0, MAX_QUEUE), &[]);
    let _ = r.call(req::SET_VRING_BASE, &raw::state(0, 0), &[]);
    let addr = raw::vring_addr(0, 0, uaddr, uaddr + 8192, uaddr + 4096, 0);
    let _ = r.call(req::SET_VRING_ADDR, &addr, &[]);
    let (call, kick) = (eventfd(), eventfd());
    let _ = r.vring_fd(req::SET_VRING_CALL, 0, Some(call.as_raw_fd()));
    let _ = r.vring_fd(req::SET_VRING_KICK, 0, Some(kick.as_raw_fd()));
    let _ = r.call(req::SET_VRING_ENABLE, &raw::state(0, 1), &[]);
    let _ = kick.write(1);
    std::thread::sleep(Duration::from_millis(300));
}

/// A region of `size` bytes on a memfd of `fd_size` bytes at `offset`.
fn short_region(gpa: u64, size: u64, fd_size: u64, offset: u64) -> (Region, std::fs::File) {
    let f = raw::memfd(fd_size);
    let r = Region {
        gpa,
        size,
        uaddr: FAKE_UADDR,
        offset,
        fd: f.as_raw_fd(),
    };
    (r, f)
}

/// 64 MiB region on a 4 MiB memfd (or a region starting at the fd's end), then a ring in the
/// missing part.
fn region_past_eof_ring(c: &Ctx, size: u64, offset: u64) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let (reg, _f) = short_region(MIB, size, 4 * MIB, offset);
    let o = r.mem_table(&[reg]);
    if o.is_ack() {
        ring_at(&r, FAKE_UADDR + size / 2);
    }
    Ok(o)
}

/// A valid region (rings) plus a 64 MiB region on a 4 MiB memfd, given by SET_MEM_TABLE or
/// ADD_MEM_REG; then a write whose data lies in the missing part.
fn region_past_eof_request(c: &Ctx, add_mem_reg: bool) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let mem = GuestMem::with_size(MIB).unwrap();
    let mut regions = raw::regions_of(&mem);
    let bad_gpa = 0x1000_0000;
    let (bad, _f) = short_region(bad_gpa, 64 * MIB, 4 * MIB, 0);
    let o = if add_mem_reg {
        for reg in &regions {
            r.ok(
                "ADD_MEM_REG (valid)",
                req::ADD_MEM_REG,
                &raw::single_region_body(reg),
                &[reg.fd],
            )?;
        }
        r.call(req::ADD_MEM_REG, &raw::single_region_body(&bad), &[bad.fd])
    } else {
        regions.push(bad);
        r.mem_table(&regions)
    };
    if o.is_ack() {
        let mut q = Queue::new(&mem, 0, MAX_QUEUE as u16).unwrap();
        r.start_queue(&mem, &q, q.call_fd().as_raw_fd(), q.kick_fd().as_raw_fd())?;
        let (_h, status) = raw_write(&mut q, &mem, 0, bad_gpa + 32 * MIB, 4096)?;
        let after = used_or_closed(&r, &mut q, &status, Duration::from_millis(500));
        c.note(format!(
            "accepted; the write into the missing part: {}",
            after.describe()
        ));
    }
    Ok(o)
}

/// A valid memory of two regions in one memfd; I/O into the second; the frontend shrinks the
/// memfd to the first region; a write whose data lies in the second.
fn shrunk_memfd(c: &Ctx) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let r1 = 16 * MIB;
    let mem = GuestMem::new(&[
        RegionSpec {
            gpa: MIB,
            size: MIB,
        },
        RegionSpec {
            gpa: r1,
            size: 4 * MIB,
        },
    ])
    .unwrap();
    let regions = raw::regions_of(&mem);
    let o = r.mem_table(&regions);
    if !o.is_ack() {
        return Err(format!("set-up step SET_MEM_TABLE: {}", o.describe()));
    }
    let mut q = Queue::new(&mem, 0, MAX_QUEUE as u16).unwrap();
    r.start_queue(&mem, &q, q.call_fd().as_raw_fd(), q.kick_fd().as_raw_fd())?;
    // Mid-I/O: a write from the second region succeeds.
    mem.write(r1, &[0x3c; 4096]).unwrap();
    let (_h, status) = raw_write(&mut q, &mem, 8, r1, 4096)?;
    match used_or_closed(&r, &mut q, &status, T) {
        Outcome::Used(0) => {}
        other => return Err(format!("write before the shrink: {}", other.describe())),
    }
    r.set_timeout(T);
    raw::ftruncate(regions[0].fd, MIB);
    let (_h2, status) = raw_write(&mut q, &mem, 16, r1 + 8192, 4096)?;
    Ok(used_or_closed(&r, &mut q, &status, T))
}

fn region(gpa: u64, size: u64, uaddr: u64, offset: u64, fd: RawFd) -> Region {
    Region {
        gpa,
        size,
        uaddr,
        offset,
        fd,
    }
}

/// SET_MEM_TABLE with regions made by `f` from a 4 MiB memfd.
fn table(c: &Ctx, f: impl Fn(RawFd) -> Vec<Region>) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let file = raw::memfd(4 * MIB);
    Ok(r.mem_table(&f(file.as_raw_fd())))
}

fn too_many_add_mem_reg(c: &Ctx) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let slots = r.get_u64(req::GET_MAX_MEM_SLOTS)?;
    c.note(format!("GET_MAX_MEM_SLOTS = {slots}"));
    if slots != 509 {
        return Err(format!("GET_MAX_MEM_SLOTS answered {slots}, expected 509"));
    }
    let file = raw::memfd((slots + 1) * 4096);
    let reg = |i: u64| region(MIB + i * 8192, 4096, FAKE_UADDR + i * 8192, i * 4096, 0);
    for i in 0..slots {
        let mut g = reg(i);
        g.fd = file.as_raw_fd();
        r.ok(
            &format!("ADD_MEM_REG slot {i}"),
            req::ADD_MEM_REG,
            &raw::single_region_body(&g),
            &[g.fd],
        )?;
    }
    let mut g = reg(slots);
    g.fd = file.as_raw_fd();
    Ok(r.call(req::ADD_MEM_REG, &raw::single_region_body(&g), &[g.fd]))
}

fn rem_never_added(c: &Ctx) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let mem = GuestMem::with_size(MIB).unwrap();
    for reg in raw::regions_of(&mem) {
        r.ok(
            "ADD_MEM_REG",
            req::ADD_MEM_REG,
            &raw::single_region_body(&reg),
            &[reg.fd],
        )?;
    }
    let f = raw::memfd(MIB);
    let other = region(0x4000_0000, MIB, FAKE_UADDR, 0, f.as_raw_fd());
    Ok(r.call(
        req::REM_MEM_REG,
        &raw::single_region_body(&other),
        &[other.fd],
    ))
}

// ---- vring cases ----

/// A vring message for queue `index` after a ready set-up, with valid values otherwise.
fn vring_msg(c: &Ctx, code: u32, index: u32) -> Result<Outcome, String> {
    let (r, mem) = c.ready()?;
    let ev = eventfd();
    Ok(match code {
        req::SET_VRING_NUM => r.call(code, &raw::state(index, MAX_QUEUE), &[]),
        req::SET_VRING_BASE => r.call(code, &raw::state(index, 0), &[]),
        req::SET_VRING_ENABLE => r.call(code, &raw::state(index, 1), &[]),
        req::GET_VRING_BASE => r.get(code, &raw::state(index, 0)),
        req::SET_VRING_ADDR => {
            let q = Queue::new(&mem, 0, MAX_QUEUE as u16).unwrap();
            let mut body = raw::queue_addr(&mem, &q);
            body[0..4].copy_from_slice(&index.to_le_bytes());
            r.call(code, &body, &[])
        }
        _ => r.vring_fd(code, index as u8, Some(ev.as_raw_fd())),
    })
}

fn vring_num(c: &Ctx, num: u32) -> Result<Outcome, String> {
    let (r, _mem) = c.ready()?;
    Ok(r.call(req::SET_VRING_NUM, &raw::state(0, num), &[]))
}

fn vring_base(c: &Ctx, base: u32) -> Result<Outcome, String> {
    let (r, _mem) = c.ready()?;
    r.ok(
        "SET_VRING_NUM",
        req::SET_VRING_NUM,
        &raw::state(0, MAX_QUEUE),
        &[],
    )?;
    Ok(r.call(req::SET_VRING_BASE, &raw::state(0, base), &[]))
}

/// The well-behaved start of queue 0's set-up: its size (the device's maximum) and base 0.
fn size_and_base(r: &Raw) -> Result<(), String> {
    r.ok(
        "SET_VRING_NUM",
        req::SET_VRING_NUM,
        &raw::state(0, MAX_QUEUE),
        &[],
    )?;
    r.ok(
        "SET_VRING_BASE",
        req::SET_VRING_BASE,
        &raw::state(0, 0),
        &[],
    )
}

/// SET_VRING_ADDR with the rings moved by `f(desc, used, avail, end)` (`end`: the user address
/// just past guest memory). Refused at SET_VRING_ADDR, or at the latest at SET_VRING_KICK
/// (when a frontend sends the size after the addresses, the check can only happen there);
/// if neither refuses, the queue is kicked to see what the daemon does with it.
fn vring_addr_bad(
    c: &Ctx,
    f: impl Fn(u64, u64, u64, u64) -> (u64, u64, u64),
) -> Result<Outcome, String> {
    let (r, mem) = c.ready()?;
    let q = Queue::new(&mem, 0, MAX_QUEUE as u16).unwrap();
    size_and_base(&r)?;
    let spec = mem.regions()[0];
    let end = mem.host_address(spec.gpa + spec.size - 1).unwrap() + 1;
    let h = |gpa| mem.host_address(gpa).unwrap();
    let (d, u, a) = f(
        h(q.desc_table_gpa()),
        h(q.used_gpa()),
        h(q.avail_gpa()),
        end,
    );
    let o = r.call(req::SET_VRING_ADDR, &raw::vring_addr(0, 0, d, u, a, 0), &[]);
    if !o.is_ack() {
        return Ok(o);
    }
    let (call, kick) = (eventfd(), eventfd());
    let o = r.vring_fd(req::SET_VRING_CALL, 0, Some(call.as_raw_fd()));
    if !o.is_ack() {
        return Ok(o);
    }
    let o = r.vring_fd(req::SET_VRING_KICK, 0, Some(kick.as_raw_fd()));
    if o.is_ack() {
        let _ = r.call(req::SET_VRING_ENABLE, &raw::state(0, 1), &[]);
        let _ = kick.write(1);
        std::thread::sleep(Duration::from_millis(100));
        c.note("accepted at SET_VRING_ADDR and SET_VRING_KICK".into());
    } else {
        c.note(format!(
            "SET_VRING_ADDR acked, SET_VRING_KICK: {}",
            o.describe()
        ));
    }
    Ok(o)
}

/// The kinds of fd that are not an eventfd.
#[derive(Clone, Copy, Debug)]
enum NotEventFd {
    Pipe,
    File,
    Socket,
}

fn not_eventfd(c: &Ctx, code: u32, kind: NotEventFd) -> Result<Outcome, String> {
    let (r, _mem) = c.ready()?;
    r.ok(
        "SET_VRING_NUM",
        req::SET_VRING_NUM,
        &raw::state(0, MAX_QUEUE),
        &[],
    )?;
    let fd: OwnedFd = match kind {
        NotEventFd::Pipe => {
            let (rd, wr) = raw::pipe();
            // The daemon reads a kick fd and writes call / err fds.
            if code == req::SET_VRING_KICK {
                c.keep.borrow_mut().push(Box::new(wr));
                rd
            } else {
                c.keep.borrow_mut().push(Box::new(rd));
                wr
            }
        }
        NotEventFd::File => std::fs::File::create(c.dir.join("notify-file"))
            .unwrap()
            .into(),
        NotEventFd::Socket => {
            let (s1, s2) = UnixStream::pair().unwrap();
            c.keep.borrow_mut().push(Box::new(s2));
            s1.into()
        }
    };
    Ok(r.vring_fd(code, 0, Some(fd.as_raw_fd())))
}

/// A call fd that is a pipe nobody reads, then more completions than the pipe holds
/// (8192 eventfd writes fill 64 KiB); the pipe's read end stays open (held elsewhere, as a
/// frontend can), the connection is closed, and the checks after the case need a new
/// connection to be served.
fn pipe_call_completions(c: &Ctx) -> Result<Outcome, String> {
    let (r, mem) = c.ready()?;
    let mut q = Queue::new(&mem, 0, MAX_QUEUE as u16).unwrap();
    size_and_base(&r)?;
    r.ok(
        "SET_VRING_ADDR",
        req::SET_VRING_ADDR,
        &raw::queue_addr(&mem, &q),
        &[],
    )?;
    let (rd, wr) = raw::pipe();
    let o = r.vring_fd(req::SET_VRING_CALL, 0, Some(wr.as_raw_fd()));
    drop(wr);
    c.keep.borrow_mut().push(Box::new(rd));
    if !o.is_ack() {
        return Ok(o);
    }
    let k = r.vring_fd(req::SET_VRING_KICK, 0, Some(q.kick_fd().as_raw_fd()));
    let e = r.call(req::SET_VRING_ENABLE, &raw::state(0, 1), &[]);
    if !k.is_ack() || !e.is_ack() {
        return Err(format!("KICK: {}, ENABLE: {}", k.describe(), e.describe()));
    }
    let page = vec![0x77u8; 4096];
    let mut done = 0u32;
    for n in 0..9000u64 {
        if q.enqueue(&Request::write((n % 512) * 8, &page)).is_err() || q.kick().is_err() {
            break;
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut got = false;
        while Instant::now() < deadline {
            if q.poll_complete().map(|v| !v.is_empty()).unwrap_or(false) {
                got = true;
                break;
            }
            std::thread::yield_now();
        }
        if !got {
            break;
        }
        done += 1;
    }
    c.note(format!(
        "pipe call fd accepted; {done} of 9000 completions before the queue stalled"
    ));
    Ok(o)
}

// ---- protocol-feature, config, framing, ordering cases ----

fn unoffered_protocol_then(c: &Ctx, bits: u64, then: u32) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let o = r.call(
        req::SET_PROTOCOL_FEATURES,
        &raw::u64_body(proto::WANTED | bits),
        &[],
    );
    // The acknowledgement of the unoffered bits must itself be refused.
    if then == req::SET_PROTOCOL_FEATURES || !o.is_nack() {
        return Ok(o);
    }
    c.note(format!("SET_PROTOCOL_FEATURES before it: {}", o.describe()));
    if then == req::SET_LOG_BASE {
        let f = raw::memfd(4096);
        let mut body = raw::u64_body(4096);
        body.extend_from_slice(&0u64.to_le_bytes());
        Ok(r.call(req::SET_LOG_BASE, &body, &[f.as_raw_fd()]))
    } else {
        let (s1, _s2) = UnixStream::pair().unwrap();
        Ok(r.call(req::SET_BACKEND_REQ_FD, &[], &[s1.as_raw_fd()]))
    }
}

fn unoffered_features(c: &Ctx) -> Result<Outcome, String> {
    let r = c.raw()?;
    r.owner()?;
    let offered = r.get_u64(req::GET_FEATURES)?;
    r.protocol(proto::WANTED)?;
    let extra = (1u64 << 50) | (1 << 34);
    if offered & extra != 0 {
        return Err(format!(
            "features {offered:#x} include the bits used as unoffered"
        ));
    }
    Ok(r.call(req::SET_FEATURES, &raw::u64_body(FEATURES | extra), &[]))
}

fn get_config(c: &Ctx, offset: u32, size: u32) -> Result<Outcome, String> {
    let (r, _mem) = c.ready()?;
    Ok(r.get(
        req::GET_CONFIG,
        &raw::config(offset, size, &vec![0; size.min(4096) as usize]),
    ))
}

fn set_config(c: &Ctx, offset: u32, size: u32) -> Result<Outcome, String> {
    let (r, _mem) = c.ready()?;
    Ok(r.call(
        req::SET_CONFIG,
        &raw::config(offset, size, &vec![0xee; size.min(4096) as usize]),
        &[],
    ))
}

/// After negotiation, puts `bytes` (with `fds`) on the socket and reads the answer.
fn framing(c: &Ctx, bytes: Vec<u8>, fds: usize) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let evs: Vec<EventFd> = (0..fds).map(|_| eventfd()).collect();
    let raw_fds: Vec<RawFd> = evs.iter().map(|e| e.as_raw_fd()).collect();
    if let Err(o) = r.send_bytes(&bytes, &raw_fds) {
        return Ok(o);
    }
    Ok(r.recv())
}

fn msg(code: u32, flags: u32, size: u32, body: &[u8]) -> Vec<u8> {
    let mut m = raw::header(code, flags, size).to_vec();
    m.extend_from_slice(body);
    m
}

const NR: u32 = raw::VERSION | raw::NEED_REPLY;

/// Sends `bytes` and hangs up without waiting.
fn send_and_close(c: &Ctx, bytes: Vec<u8>) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let _ = r.send_bytes(&bytes, &[]);
    Ok(Outcome::Closed)
}

fn kick_before_mem_table(c: &Ctx) -> Result<Outcome, String> {
    let r = c.negotiated()?;
    let _ = r.call(req::SET_VRING_NUM, &raw::state(0, MAX_QUEUE), &[]);
    let _ = r.call(req::SET_VRING_BASE, &raw::state(0, 0), &[]);
    let (call, kick) = (eventfd(), eventfd());
    let _ = r.vring_fd(req::SET_VRING_CALL, 0, Some(call.as_raw_fd()));
    let o = r.vring_fd(req::SET_VRING_KICK, 0, Some(kick.as_raw_fd()));
    let _ = r.call(req::SET_VRING_ENABLE, &raw::state(0, 1), &[]);
    let _ = kick.write(1);
    std::thread::sleep(Duration::from_millis(100));
    let f = r.get(req::GET_FEATURES, &[]);
    if !matches!(f, Outcome::Reply { .. }) {
        return Ok(f);
    }
    Ok(o)
}

fn before_owner(c: &Ctx) -> Result<Outcome, String> {
    let r = c.raw()?;
    let offered = r.get_u64(req::GET_FEATURES)?;
    r.protocol(proto::WANTED)?;
    r.ok(
        "SET_FEATURES",
        req::SET_FEATURES,
        &raw::u64_body(offered & FEATURES),
        &[],
    )?;
    let mem = GuestMem::with_size(MIB).unwrap();
    Ok(r.mem_table(&raw::regions_of(&mem)))
}

fn in_flight_disconnect(c: &Ctx) -> Result<Outcome, String> {
    let (r, _mem, mut q) = c.started()?;
    let page = vec![0x42u8; 4096];
    for n in 0..64 {
        q.enqueue(&Request::write(n * 8, &page))
            .map_err(|e| e.to_string())?;
    }
    q.kick().map_err(|e| e.to_string())?;
    drop(r);
    Ok(Outcome::Closed)
}

fn control_session(c: &Ctx) -> Result<Outcome, String> {
    let (r, _mem, mut q) = c.started()?;
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    q.execute(&Request::write(64, &page), T)
        .and_then(|c| c.check())
        .map_err(|e| format!("write: {e}"))?;
    let got = q
        .execute(&Request::read(64, 4096), T)
        .and_then(|c| c.check())
        .map_err(|e| format!("read: {e}"))?;
    if got.data != page {
        return Err("read back other data".into());
    }
    // The connection still answers after I/O.
    Ok(r.call(req::SET_VRING_ENABLE, &raw::state(0, 1), &[]))
}

fn cases() -> Vec<Case> {
    use Expect::*;
    use NotEventFd::*;
    let mut v = vec![
        case(
            "control: well-behaved raw session, verified I/O",
            Ack,
            control_session,
        ),
        // framing
        case("SET_FEATURES, header size 4 (body 4)", NackOrClose, |c| {
            framing(c, msg(req::SET_FEATURES, NR, 4, &[1, 0, 0, 0]), 0)
        }),
        case("SET_FEATURES, header size 16 (body 16)", NackOrClose, |c| {
            framing(c, msg(req::SET_FEATURES, NR, 16, &[0; 16]), 0)
        }),
        case("SET_VRING_NUM, header size 4", NackOrClose, |c| {
            framing(c, msg(req::SET_VRING_NUM, NR, 4, &[0; 4]), 0)
        }),
        case("SET_MEM_TABLE, 1 region, size of 2", NackOrClose, |c| {
            let mut b = raw::mem_table_body(&[region(MIB, MIB, FAKE_UADDR, 0, 0)]);
            b.extend_from_slice(&[0; 32]);
            framing(c, msg(req::SET_MEM_TABLE, NR, b.len() as u32, &b), 1)
        }),
        case("header size 0x10000, nothing follows", NackOrClose, |c| {
            framing(c, msg(req::SET_FEATURES, NR, 0x10000, &[]), 0)
        }),
        case("header size 40, body 8, then close", Survive, |c| {
            send_and_close(c, msg(req::SET_VRING_ADDR, NR, 40, &[0; 8]))
        }),
        case("truncated header then close", Survive, |c| {
            send_and_close(c, raw::header(req::SET_FEATURES, NR, 8)[..6].to_vec())
        }),
        case("truncated SET_MEM_TABLE body then close", Survive, |c| {
            send_and_close(c, msg(req::SET_MEM_TABLE, NR, 40, &[1, 0, 0, 0, 0, 0]))
        }),
        case("version 2 in the header flags", NackOrClose, |c| {
            framing(
                c,
                msg(req::SET_FEATURES, 0x2 | raw::NEED_REPLY, 8, &[0; 8]),
                0,
            )
        }),
        case("SET_FEATURES with an fd attached", NackOrClose, |c| {
            let b = raw::u64_body(FEATURES);
            framing(c, msg(req::SET_FEATURES, NR, 8, &b), 1)
        }),
        case("SET_VRING_CALL with two fds", NackOrClose, |c| {
            framing(c, msg(req::SET_VRING_CALL, NR, 8, &[0; 8]), 2)
        }),
        case("SET_VRING_KICK, no fd and no NOFD flag", NackOrClose, |c| {
            framing(c, msg(req::SET_VRING_KICK, NR, 8, &[0; 8]), 0)
        }),
    ];
    for code in [0u32, 41, 99, u32::MAX] {
        v.push(case(
            format!("unknown request code {code}"),
            NackOrClose,
            move |c| framing(c, msg(code, NR, 8, &[0; 8]), 0),
        ));
    }
    v.push(case(
        "GET_INFLIGHT_FD (INFLIGHT_SHMFD not offered)",
        GetRefused,
        |c| framing(c, msg(req::GET_INFLIGHT_FD, raw::VERSION, 24, &[0; 24]), 0),
    ));
    // memory regions
    v.extend([
        case(
            "region 64M on a 4M memfd, ring in the missing part",
            Nack,
            |c| region_past_eof_ring(c, 64 * MIB, 0),
        ),
        case("region at mmap_offset == fd size, ring there", Nack, |c| {
            region_past_eof_ring(c, 4 * MIB, 4 * MIB)
        }),
        case(
            "SET_MEM_TABLE region 64M on a 4M memfd, request into the missing part",
            Nack,
            |c| region_past_eof_request(c, false),
        ),
        case(
            "ADD_MEM_REG region 64M on a 4M memfd, request into the missing part",
            Nack,
            |c| region_past_eof_request(c, true),
        ),
        case(
            "memfd shrunk by the frontend mid-I/O, then a request into the cut part",
            ClosedOrIoErr,
            shrunk_memfd,
        ),
        case("overlapping regions (guest-physical)", Nack, |c| {
            table(c, |fd| {
                vec![
                    region(MIB, MIB, FAKE_UADDR, 0, fd),
                    region(MIB + MIB / 2, MIB, FAKE_UADDR + 2 * MIB, 2 * MIB, fd),
                ]
            })
        }),
        case("overlapping regions (user address)", Nack, |c| {
            table(c, |fd| {
                vec![
                    region(MIB, MIB, FAKE_UADDR, 0, fd),
                    region(8 * MIB, MIB, FAKE_UADDR + MIB / 2, 2 * MIB, fd),
                ]
            })
        }),
        case("region guest_phys_addr + size wraps", Nack, |c| {
            table(c, |fd| {
                vec![region(u64::MAX - 0xfff, MIB, FAKE_UADDR, 0, fd)]
            })
        }),
        case("region user_addr + size wraps", Nack, |c| {
            table(c, |fd| vec![region(MIB, MIB, u64::MAX - 0xfff, 0, fd)])
        }),
        case("region mmap_offset + size wraps", Nack, |c| {
            table(c, |fd| {
                vec![region(MIB, MIB, FAKE_UADDR, u64::MAX - 0xfff, fd)]
            })
        }),
        case("zero-size region", Nack, |c| {
            table(c, |fd| vec![region(MIB, 0, FAKE_UADDR, 0, fd)])
        }),
        case("SET_MEM_TABLE with no region", NackOrClose, |c| {
            table(c, |_| vec![])
        }),
        fds_flat(case("SET_MEM_TABLE with 9 regions", NackOrClose, |c| {
            table(c, |fd| {
                (0..9)
                    .map(|i| region(MIB * (1 + 2 * i), MIB / 4, FAKE_UADDR + i * MIB, 0, fd))
                    .collect()
            })
        })),
        case("SET_MEM_TABLE, 2 regions with 1 fd", NackOrClose, |c| {
            let r = c.negotiated()?;
            let f = raw::memfd(4 * MIB);
            let fd = f.as_raw_fd();
            let b = raw::mem_table_body(&[
                region(MIB, MIB, FAKE_UADDR, 0, fd),
                region(4 * MIB, MIB, FAKE_UADDR + 4 * MIB, MIB, fd),
            ]);
            Ok(r.call(req::SET_MEM_TABLE, &b, &[fd]))
        }),
        case("region fd is a pipe", Nack, |c| {
            let (rd, _wr) = raw::pipe();
            let r = c.negotiated()?;
            Ok(r.mem_table(&[region(MIB, MIB, FAKE_UADDR, 0, rd.as_raw_fd())]))
        }),
        fds_flat(case(
            "ADD_MEM_REG beyond GET_MAX_MEM_SLOTS (510th)",
            Nack,
            too_many_add_mem_reg,
        )),
        case("REM_MEM_REG of a region never added", Nack, rem_never_added),
    ]);
    // notification fds that are not eventfds
    for (code, what) in [
        (req::SET_VRING_KICK, "KICK"),
        (req::SET_VRING_CALL, "CALL"),
        (req::SET_VRING_ERR, "ERR"),
    ] {
        for kind in [Pipe, File, Socket] {
            v.push(case(
                format!("SET_VRING_{what} with a {kind:?} (not an eventfd)"),
                Nack,
                move |c| not_eventfd(c, code, kind),
            ));
        }
    }
    v.push(case(
        "call fd a pipe nobody reads, 9000 completions, then a new connection",
        Nack,
        pipe_call_completions,
    ));
    // vring index out of range in every vring message
    for (code, what) in [
        (req::SET_VRING_NUM, "SET_VRING_NUM"),
        (req::SET_VRING_ADDR, "SET_VRING_ADDR"),
        (req::SET_VRING_BASE, "SET_VRING_BASE"),
        (req::GET_VRING_BASE, "GET_VRING_BASE"),
        (req::SET_VRING_KICK, "SET_VRING_KICK"),
        (req::SET_VRING_CALL, "SET_VRING_CALL"),
        (req::SET_VRING_ERR, "SET_VRING_ERR"),
        (req::SET_VRING_ENABLE, "SET_VRING_ENABLE"),
    ] {
        for index in [QUEUES, 255] {
            let expect = if code == req::GET_VRING_BASE {
                GetRefused
            } else {
                Nack
            };
            v.push(case(format!("{what} index {index}"), expect, move |c| {
                vring_msg(c, code, index)
            }));
        }
    }
    v.extend([
        case("SET_VRING_NUM 0", Nack, |c| vring_num(c, 0)),
        case("SET_VRING_NUM 3 (not a power of two)", Nack, |c| {
            vring_num(c, 3)
        }),
        case("SET_VRING_NUM 512 (> max queue size 256)", Nack, |c| {
            vring_num(c, 2 * MAX_QUEUE)
        }),
        case("SET_VRING_NUM 0x10000", Nack, |c| vring_num(c, 0x10000)),
        case(
            "SET_VRING_BASE 300 on a 256 ring (legal: free-running)",
            Ack,
            |c| vring_base(c, 300),
        ),
        case(
            "SET_VRING_BASE 0x10000 (beyond the 16-bit index)",
            Nack,
            |c| vring_base(c, 0x10000),
        ),
        case("SET_VRING_BASE 0xffffffff", Nack, |c| {
            vring_base(c, u32::MAX)
        }),
        case(
            "SET_VRING_ADDR desc table past the end of memory",
            Nack,
            |c| vring_addr_bad(c, |_, u, a, end| (end - 16, u, a)),
        ),
        case(
            "SET_VRING_ADDR avail ring past the end of memory",
            Nack,
            |c| vring_addr_bad(c, |d, u, _, end| (d, u, end - 4)),
        ),
        case(
            "SET_VRING_ADDR used ring past the end of memory",
            Nack,
            |c| vring_addr_bad(c, |d, _, a, end| (d, end - 8, a)),
        ),
        // The vhost crate's framing layer checks ring alignment itself and closes.
        case(
            "SET_VRING_ADDR desc table unaligned (+8)",
            NackOrClose,
            |c| vring_addr_bad(c, |d, u, a, _| (d + 8, u, a)),
        ),
        case(
            "SET_VRING_ADDR used ring unaligned (+2)",
            NackOrClose,
            |c| vring_addr_bad(c, |d, u, a, _| (d, u + 2, a)),
        ),
        case(
            "SET_VRING_ADDR avail ring unaligned (+1)",
            NackOrClose,
            |c| vring_addr_bad(c, |d, u, a, _| (d, u, a + 1)),
        ),
        case("SET_VRING_ADDR user address in no region", Nack, |c| {
            vring_addr_bad(c, |_, u, a, _| (0x1000, u, a))
        }),
        // protocol features and features
        case(
            "SET_PROTOCOL_FEATURES with unoffered LOG_SHMFD|BACKEND_REQ|INFLIGHT",
            Nack,
            |c| {
                let bits = proto::LOG_SHMFD | proto::BACKEND_REQ | proto::INFLIGHT_SHMFD;
                unoffered_protocol_then(c, bits, req::SET_PROTOCOL_FEATURES)
            },
        ),
        // Acking unoffered protocol features is answered with an error and ends the
        // connection: messages under them are never acknowledged.
        case("SET_LOG_BASE under unoffered LOG_SHMFD", NackOrClose, |c| {
            unoffered_protocol_then(c, proto::LOG_SHMFD, req::SET_LOG_BASE)
        }),
        case(
            "SET_BACKEND_REQ_FD under unoffered BACKEND_REQ",
            NackOrClose,
            |c| unoffered_protocol_then(c, proto::BACKEND_REQ, req::SET_BACKEND_REQ_FD),
        ),
        case(
            "SET_FEATURES with unoffered bits 34, 50",
            Nack,
            unoffered_features,
        ),
        // config space
        case("GET_CONFIG size 300 (> 256)", GetRefused, |c| {
            get_config(c, 0, 300)
        }),
        case("GET_CONFIG offset 4096", GetRefused, |c| {
            get_config(c, 4096, 8)
        }),
        case("GET_CONFIG offset + size wraps", GetRefused, |c| {
            get_config(c, u32::MAX - 3, 8)
        }),
        case("SET_CONFIG size 300 (> 256)", NackOrClose, |c| {
            set_config(c, 0, 300)
        }),
        case("SET_CONFIG offset 4096", Nack, |c| set_config(c, 4096, 8)),
        case("SET_CONFIG capacity (read-only field)", Nack, |c| {
            set_config(c, 0, 8)
        }),
        // order
        case(
            "SET_VRING_KICK before SET_MEM_TABLE, then kicked",
            Answered,
            kick_before_mem_table,
        ),
        case("GET_VRING_BASE on a never-started ring", Answered, |c| {
            let (r, _mem) = c.ready()?;
            Ok(r.get(req::GET_VRING_BASE, &raw::state(0, 0)))
        }),
        case("SET_MEM_TABLE before SET_OWNER", Answered, before_owner),
        // hang-ups
        case("disconnect after GET_FEATURES", Survive, |c| {
            let r = c.raw()?;
            r.owner()?;
            r.get_u64(req::GET_FEATURES)?;
            Ok(Outcome::Closed)
        }),
        case("disconnect after SET_MEM_TABLE", Survive, |c| {
            c.ready().map(|_| Outcome::Closed)
        }),
        case(
            "disconnect with 64 requests in flight",
            Survive,
            in_flight_disconnect,
        ),
    ]);
    v
}

// ---- the well-behaved frontend on B ----

#[derive(Default)]
struct BStats {
    ops: AtomicU64,
    misses: Mutex<Vec<(String, String)>>,
    label: Mutex<String>,
}

fn b_frontend(sock: PathBuf, stop: Arc<AtomicBool>, stats: Arc<BStats>) {
    let opts = Options {
        mem_size: 4 * MIB,
        connect_timeout: Duration::from_secs(10),
        reply_timeout: Some(Duration::from_secs(5)),
        ..Options::default()
    };
    // A miss is charged to the case that was running when the failed operation began.
    let miss = |began: &str, e: String| {
        let now = stats.label.lock().unwrap().clone();
        let label = if now == began {
            now
        } else {
            format!("{began} .. {now}")
        };
        stats.misses.lock().unwrap().push((label, e));
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let began = stats.label.lock().unwrap().clone();
        let mut dev = match Frontend::connect(&sock, &opts) {
            Ok(d) => d,
            Err(e) => {
                miss(&began, format!("connect: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut q = dev.take_queue(0).unwrap();
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let began = stats.label.lock().unwrap().clone();
            let sector = (n % 2048) * 8;
            let page: Vec<u8> = (0..4096u64).map(|i| (i ^ n) as u8).collect();
            let r = q
                .execute(&Request::write(sector, &page), T)
                .and_then(|c| c.check())
                .and_then(|_| q.execute(&Request::read(sector, 4096), T))
                .and_then(|c| c.check());
            match r {
                Ok(c) if c.data == page => {
                    stats.ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => miss(&began, format!("op {n}: read back other data")),
                Err(e) => {
                    miss(&began, format!("op {n}: {e}"));
                    break;
                }
            }
        }
        drop(q);
        dev.disconnect();
    }
}

struct Row {
    name: String,
    expect: Expect,
    got: String,
    problems: Vec<String>,
}

#[test]
fn hostile_frontend_cannot_stop_other_disks() {
    let start = Instant::now();
    let dir = TempDir::new("hostile");
    let a = dir.0.join("a.sock");
    let b = dir.0.join("b.sock");
    let args: Vec<String> = [
        "--device".to_string(),
        format!("socket={},size=64M", a.display()),
        "--device".to_string(),
        format!("socket={},size=64M", b.display()),
        "--control".to_string(),
        dir.0.join("vzram.ctl").display().to_string(),
        "--num-queues".to_string(),
        QUEUES.to_string(),
        "--policy".to_string(),
        "off".to_string(),
    ]
    .to_vec();
    let log = dir.0.join("vzram.log");
    let sockets = [a.clone(), b.clone()];
    let mut daemon = KillOnDrop(Daemon::start(&args, &log, &sockets));
    // A watchdog bounds the daemons' lives even if the suite hangs somewhere.
    let started: Arc<Mutex<Vec<Daemon>>> = Arc::new(Mutex::new(vec![daemon.0.clone()]));
    {
        let started = started.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(170));
            for d in started.lock().unwrap().iter() {
                d.kill();
            }
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(BStats::default());
    let b_thread = {
        let (b, stop, stats) = (b.clone(), stop.clone(), stats.clone());
        std::thread::spawn(move || b_frontend(b, stop, stats))
    };
    // B is up and working before the first case.
    assert!(
        poll_until(Duration::from_secs(10), || stats
            .ops
            .load(Ordering::Relaxed)
            > 0),
        "the well-behaved frontend on B never completed an I/O"
    );

    let mut rows = Vec::new();
    let mut restarts = Vec::new();
    for (i, c) in cases().into_iter().enumerate() {
        *stats.label.lock().unwrap() = c.name.clone();
        let mut row = Row {
            name: c.name.clone(),
            expect: c.expect,
            got: String::new(),
            problems: Vec::new(),
        };
        if start.elapsed() > Duration::from_secs(100) {
            row.got = "not run".into();
            row.problems.push("suite deadline passed".into());
            rows.push(row);
            continue;
        }
        let ctx = Ctx {
            a: a.clone(),
            dir: dir.0.clone(),
            keep: RefCell::new(Vec::new()),
            notes: RefCell::new(Vec::new()),
        };
        let fds_before = daemon.0.fds();
        let t0 = Instant::now();
        match (c.run)(&ctx) {
            Ok(o) => {
                row.got = o.describe();
                if !c.expect.met(&o) {
                    row.problems.push(format!("expected {:?}", c.expect));
                }
            }
            Err(e) => {
                row.got = format!("case error: {e}");
                row.problems.push("could not run as written".into());
            }
        }
        let took = t0.elapsed();
        // The case's connection is closed now (everything it made is dropped).
        let mut dead = daemon.0.exited();
        if dead.is_none() && c.fds_flat {
            let flat = poll_until(Duration::from_secs(2), || daemon.0.fds() <= fds_before);
            if !flat {
                row.problems.push(format!(
                    "daemon fds {fds_before} before, {} after",
                    daemon.0.fds()
                ));
            }
        }
        if dead.is_none() {
            if let Err(e) = fresh_io(&a, i as u64) {
                row.problems.push(format!("fresh connection on A: {e}"));
            }
            dead = daemon.0.exited();
        }
        ctx.keep.borrow_mut().clear();
        if let Some(st) = dead {
            row.problems
                .push(format!("daemon died: {}", describe_status(st)));
        }
        for n in ctx.notes.borrow().iter() {
            row.got.push_str(&format!("; {n}"));
        }
        if took > Duration::from_secs(3) {
            row.got.push_str(&format!(" [{took:.1?}]"));
        }
        let broken = dead.is_some() || row.problems.iter().any(|p| p.starts_with("fresh"));
        rows.push(row);
        if broken {
            // Start a clean daemon so that later cases are judged on their own.
            *stats.label.lock().unwrap() = format!("restart after: {}", c.name);
            daemon.0.kill();
            restarts.push(c.name.clone());
            daemon.0 = Daemon::start(&args, &log, &sockets);
            started.lock().unwrap().push(daemon.0.clone());
        }
    }
    *stats.label.lock().unwrap() = "after the last case".into();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    b_thread.join().unwrap();
    let alive_at_end = daemon.0.exited();

    // B's misses, charged to the case during which the failed operation began (a daemon that
    // dies is noticed by B only after its request timeout). A restart of the daemon by this
    // harness (after a case that killed it or left A unusable) also costs B its connection:
    // those misses count against the case that made the restart necessary, or show as
    // "restart after ..." and fail nothing on their own (that case has failed already).
    let misses = stats.misses.lock().unwrap().clone();
    for r in rows.iter_mut() {
        let n = misses
            .iter()
            .filter(|(label, _)| label == &r.name || label.starts_with(&format!("{} ..", r.name)))
            .count();
        if n > 0 {
            r.problems.push(format!("B saw {n} errors"));
        }
    }
    let own_misses = misses
        .iter()
        .filter(|(label, _)| !label.starts_with("restart after"))
        .count();
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.problems.is_empty()).collect();
    eprintln!("\n{:<4} {:<70} {:<12} outcome", "", "case", "expected");
    for r in &rows {
        let verdict = if r.problems.is_empty() { "ok" } else { "FAIL" };
        eprintln!(
            "{verdict:<4} {:<70} {:<12} {}{}",
            r.name,
            format!("{:?}", r.expect),
            r.got,
            if r.problems.is_empty() {
                String::new()
            } else {
                format!(" -- {}", r.problems.join("; "))
            }
        );
    }
    eprintln!(
        "\n{} cases, {} failed, {} daemon restarts; B: {} verified write+read pairs, {} misses; {:.1?}",
        rows.len(),
        failed.len(),
        restarts.len(),
        stats.ops.load(Ordering::Relaxed),
        misses.len(),
        start.elapsed()
    );
    for (label, e) in misses.iter().take(20) {
        eprintln!("B miss during [{label}]: {e}");
    }
    assert!(
        alive_at_end.is_none(),
        "the daemon exited at the end: {alive_at_end:?}"
    );
    assert!(
        stats.ops.load(Ordering::Relaxed) > 100,
        "B did too little I/O to mean anything"
    );
    assert!(
        failed.is_empty() && own_misses == 0,
        "{} of {} hostile cases failed, B missed {} times (table above)",
        failed.len(),
        rows.len(),
        own_misses
    );
}
