//! A split virtqueue as the driver sees it: raw descriptor and ring access, notification with
//! suppression, and blocking waits on the call eventfd.

use crate::blk::Inflight;
use crate::mem::{GuestBuf, GuestMem};
use crate::virtio::{Desc, UsedElem};
use crate::{Completion, Error, Result};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// One buffer of a chain: guest address, length, and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainSeg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub write: bool,
}

/// What a queue has done, for tests of notification suppression and for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RingCounters {
    /// Chains published on the avail ring.
    pub published: u64,
    /// Eventfd kicks sent to the backend.
    pub kicks: u64,
    /// Kicks [`Queue::notify`] left out because the device asked not to be kicked.
    pub suppressed_kicks: u64,
    /// Times the driver blocked on the call eventfd.
    pub sleeps: u64,
    /// Used elements reaped.
    pub used: u64,
}

/// A split virtqueue driven by this frontend.
///
/// Layout in guest memory (each part page-aligned in its own allocation): the descriptor table
/// (16 bytes per entry), the avail ring (`flags`, `idx`, `ring[size]`, `used_event`) and the used
/// ring (`flags`, `idx`, `ring[size]` of `{id: u32, len: u32}`, `avail_event`).
///
/// The low-level methods do exactly what they say and check nothing about virtio validity: they
/// exist to build malformed chains. The high-level virtio-blk methods ([`Queue::submit`] and
/// friends, in this crate's `blk` module) take descriptors from the queue's free list; raw
/// users that share a queue with them take theirs from the same list with
/// [`Queue::alloc_descs`].
#[derive(Debug)]
pub struct Queue {
    pub(crate) mem: Arc<GuestMem>,
    pub(crate) index: u16,
    pub(crate) size: u16,
    desc_buf: GuestBuf,
    avail_buf: GuestBuf,
    used_buf: GuestBuf,
    kick: EventFd,
    call: EventFd,
    pub(crate) event_idx: bool,
    pub(crate) indirect: bool,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    pub(crate) inflight: Vec<Option<Inflight>>,
    pub(crate) ready: VecDeque<Completion>,
    pub(crate) next_tag: u64,
    counters: RingCounters,
    /// The connection's vhost-user socket (held by the [`crate::Frontend`]): a wait ends with
    /// an error when the backend hangs up instead of lasting its whole timeout.
    peer: Weak<OwnedFd>,
}

impl Queue {
    /// A queue of `size` entries with fresh (zeroed) rings in `mem`. `event_idx` and
    /// `indirect` say what was negotiated; [`crate::Frontend`] sets them.
    pub fn new(mem: &Arc<GuestMem>, index: u16, size: u16) -> Result<Queue> {
        if size == 0 || !size.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "queue size {size} must be a power of two (split rings index modulo size)"
            )));
        }
        let n = size as usize;
        let desc_buf = mem.alloc(16 * n, 4096)?;
        let avail_buf = mem.alloc(6 + 2 * n, 4096)?;
        let used_buf = mem.alloc(6 + 8 * n, 4096)?;
        Ok(Queue {
            mem: Arc::clone(mem),
            index,
            size,
            desc_buf,
            avail_buf,
            used_buf,
            kick: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            call: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            event_idx: false,
            indirect: false,
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            inflight: (0..size).map(|_| None).collect(),
            ready: VecDeque::new(),
            next_tag: 0,
            counters: RingCounters::default(),
            peer: Weak::new(),
        })
    }

    /// Forgets all state and zeroes the rings, as a driver does after a device reset. Requests
    /// in flight are dropped (their buffers freed).
    pub fn reset(&mut self) -> Result<()> {
        self.desc_buf.fill(0)?;
        self.avail_buf.fill(0)?;
        self.used_buf.fill(0)?;
        self.next_avail = 0;
        self.kicked_avail = 0;
        self.last_used = 0;
        self.free = (0..self.size).rev().collect();
        self.inflight.iter_mut().for_each(|s| *s = None);
        self.ready.clear();
        // A stale wake-up would only cost a spurious loop, but tests count sleeps.
        let _ = self.call.read();
        Ok(())
    }

    /// Queue index within the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of ring entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The guest memory the queue lives in.
    pub fn mem(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// Whether EVENT_IDX is used on this queue.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Switches EVENT_IDX handling; must match what was negotiated.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Whether indirect descriptors were negotiated.
    pub fn indirect_negotiated(&self) -> bool {
        self.indirect
    }

    /// Records whether indirect descriptors were negotiated.
    pub fn set_indirect(&mut self, on: bool) {
        self.indirect = on;
    }

    /// Guest address of the descriptor table.
    pub fn desc_table_gpa(&self) -> u64 {
        self.desc_buf.gpa()
    }

    /// Guest address of the avail ring.
    pub fn avail_gpa(&self) -> u64 {
        self.avail_buf.gpa()
    }

    /// Guest address of the used ring.
    pub fn used_gpa(&self) -> u64 {
        self.used_buf.gpa()
    }

    /// The kick eventfd (frontend writes, backend reads).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (backend writes, frontend waits on it).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Counters so far.
    pub fn counters(&self) -> RingCounters {
        self.counters
    }

    /// The avail index published so far (the driver's shadow of `avail->idx`).
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// The used index up to which elements were reaped.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    // ---- descriptors ----

    /// Writes descriptor `index` of the table (`index < size`; use [`GuestMem::write_descs`]
    /// for indirect tables).
    pub fn write_desc(&self, index: u16, desc: Desc) -> Result<()> {
        if index >= self.size {
            return Err(Error::Invalid(format!(
                "descriptor {index} is outside a {}-entry table",
                self.size
            )));
        }
        self.mem
            .write(self.desc_buf.gpa() + 16 * index as u64, &desc.to_bytes())
    }

    /// Reads descriptor `index` of the table.
    pub fn read_desc(&self, index: u16) -> Result<Desc> {
        if index >= self.size {
            return Err(Error::Invalid(format!(
                "descriptor {index} is outside the table"
            )));
        }
        let mut b = [0u8; 16];
        self.mem
            .read(self.desc_buf.gpa() + 16 * index as u64, &mut b)?;
        Ok(Desc::from_bytes(&b))
    }

    /// Takes `n` descriptor indices off the free list (so the high-level API will not reuse them).
    pub fn alloc_descs(&mut self, n: usize) -> Result<Vec<u16>> {
        if self.free.len() < n {
            return Err(Error::NoDescriptors {
                queue: self.index,
                need: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut ids = self.free.split_off(at);
        ids.reverse();
        Ok(ids)
    }

    /// Returns descriptor indices to the free list.
    pub fn free_descs(&mut self, ids: &[u16]) {
        self.free.extend(ids.iter().rev().copied());
    }

    /// Number of free descriptors.
    pub fn free_desc_count(&self) -> usize {
        self.free.len()
    }

    /// Writes a well-linked chain: descriptor `ids[i]` describes `segs[i]` and continues at
    /// `ids[i + 1]`. Directions come from the segments, unchecked.
    pub fn write_chain(&self, ids: &[u16], segs: &[ChainSeg]) -> Result<()> {
        if ids.len() != segs.len() || ids.is_empty() {
            return Err(Error::Invalid(format!(
                "{} descriptor ids for {} segments",
                ids.len(),
                segs.len()
            )));
        }
        for (i, (id, seg)) in ids.iter().zip(segs).enumerate() {
            self.write_desc(*id, chain_desc(seg, ids.get(i + 1).copied()))?;
        }
        Ok(())
    }

    /// Allocates descriptors for `segs`, writes the chain and returns its head (not published).
    pub fn add_chain(&mut self, segs: &[ChainSeg]) -> Result<u16> {
        let ids = self.alloc_descs(segs.len())?;
        if let Err(e) = self.write_chain(&ids, segs) {
            self.free_descs(&ids);
            return Err(e);
        }
        Ok(ids[0])
    }

    // ---- avail ring ----

    /// Puts `heads` on the avail ring (any values, in range or not) and publishes the new
    /// `avail->idx` with release ordering. Does not kick.
    pub fn push_avail(&mut self, heads: &[u16]) -> Result<()> {
        let ring = self.avail_buf.gpa() + 4;
        for &head in heads {
            let slot = (self.next_avail % self.size) as u64;
            self.mem
                .store_u16(ring + 2 * slot, head, Ordering::Relaxed)?;
            self.next_avail = self.next_avail.wrapping_add(1);
        }
        self.counters.published += heads.len() as u64;
        self.mem
            .store_u16(self.avail_buf.gpa() + 2, self.next_avail, Ordering::Release)
    }

    /// Writes `avail->idx` directly (e.g. more than `size` ahead of the device), keeping the
    /// ring entries as they are.
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<()> {
        self.next_avail = idx;
        self.mem
            .store_u16(self.avail_buf.gpa() + 2, idx, Ordering::Release)
    }

    /// Writes `avail->flags` (`VRING_AVAIL_F_NO_INTERRUPT` is bit 0).
    pub fn set_avail_flags(&self, flags: u16) -> Result<()> {
        self.mem
            .store_u16(self.avail_buf.gpa(), flags, Ordering::Release)
    }

    /// Writes `used_event` (the tail of the avail ring; meaningful with EVENT_IDX).
    pub fn set_used_event(&self, val: u16) -> Result<()> {
        self.mem
            .store_u16(self.used_event_gpa(), val, Ordering::Relaxed)
    }

    fn used_event_gpa(&self) -> u64 {
        self.avail_buf.gpa() + 4 + 2 * self.size as u64
    }

    // ---- notification ----

    /// Kicks the backend unconditionally.
    pub fn kick(&mut self) -> Result<()> {
        self.kick.write(1)?;
        self.counters.kicks += 1;
        Ok(())
    }

    /// Kicks the backend if it asked to be kicked for what was published since the last
    /// notify: with EVENT_IDX when `avail_event` lies in the newly published range, otherwise
    /// unless `VRING_USED_F_NO_NOTIFY` is set. Returns whether it kicked.
    pub fn notify(&mut self) -> Result<bool> {
        // Publish avail->idx before reading the device's suppression state; pairs with the
        // fence the device puts between writing avail_event / flags and re-reading avail->idx.
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_avail, self.next_avail);
        self.kicked_avail = new;
        if old == new {
            return Ok(false);
        }
        let need = if self.event_idx {
            let event = self.avail_event()?;
            need_event(event, new, old)
        } else {
            self.used_flags()? & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if need {
            self.kick()?;
        } else {
            self.counters.suppressed_kicks += 1;
        }
        Ok(need)
    }

    /// `used->flags` as the device wrote it.
    pub fn used_flags(&self) -> Result<u16> {
        self.mem.load_u16(self.used_buf.gpa(), Ordering::Acquire)
    }

    /// `avail_event` (tail of the used ring) as the device wrote it.
    pub fn avail_event(&self) -> Result<u16> {
        self.mem.load_u16(
            self.used_buf.gpa() + 4 + 8 * self.size as u64,
            Ordering::Acquire,
        )
    }

    // ---- used ring ----

    /// `used->idx` as the device wrote it.
    pub fn used_idx(&self) -> Result<u16> {
        self.mem
            .load_u16(self.used_buf.gpa() + 2, Ordering::Acquire)
    }

    /// Reaps what the device has put in the used ring since the last reap, without waiting.
    /// A used index more than `size` ahead is a protocol violation.
    pub fn poll_used(&mut self) -> Result<Vec<UsedElem>> {
        let idx = self.used_idx()?;
        let n = idx.wrapping_sub(self.last_used);
        if n > self.size {
            return Err(Error::Protocol(format!(
                "queue {}: used idx {idx} is {n} entries past {}, more than the {} the ring holds",
                self.index, self.last_used, self.size
            )));
        }
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let slot = (self.last_used.wrapping_add(i) % self.size) as u64;
            let mut b = [0u8; 8];
            self.mem.read(self.used_buf.gpa() + 4 + 8 * slot, &mut b)?;
            out.push(UsedElem {
                id: u32::from_le_bytes(b[0..4].try_into().unwrap()),
                len: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            });
        }
        self.last_used = idx;
        self.counters.used += n as u64;
        Ok(out)
    }

    /// Waits until the device has used at least one chain, then reaps all that are there.
    ///
    /// With EVENT_IDX it first sets `used_event` to the next entry it expects, then re-checks
    /// `used->idx` after a full fence, and only then sleeps on the call eventfd, so that a
    /// completion that races with going to sleep still wakes it.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Vec<UsedElem>> {
        let start = Instant::now();
        loop {
            let got = self.poll_used()?;
            if !got.is_empty() {
                return Ok(got);
            }
            if self.event_idx {
                self.set_used_event(self.last_used)?;
            }
            fence(Ordering::SeqCst);
            if self.used_idx()? != self.last_used {
                continue;
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(Error::Timeout {
                    queue: self.index,
                    waited,
                });
            }
            self.sleep(timeout - waited)?;
        }
    }

    /// Waits up to `timeout` for a call-eventfd signal and consumes it.
    /// Returns whether a signal came.
    pub fn wait_call(&mut self, timeout: Duration) -> Result<bool> {
        self.sleep(timeout)
    }

    /// Which connection's hang-up ends this queue's waits ([`crate::Frontend::attach_queue`]).
    pub(crate) fn set_peer(&mut self, peer: Weak<OwnedFd>) {
        self.peer = peer;
    }

    /// Sleeps on the call eventfd up to `timeout`. Fails at once if the backend hangs up
    /// (its vhost-user socket closes) while nothing was signalled: a dead backend never
    /// signals again.
    fn sleep(&mut self, timeout: Duration) -> Result<bool> {
        /// The socket is held for at most this long per poll, so that dropping the device
        /// (closing the connection) is not delayed by a waiting queue.
        const SLICE: Duration = Duration::from_millis(200);
        self.counters.sleeps += 1;
        let deadline = Instant::now() + timeout;
        loop {
            let peer = self.peer.upgrade();
            let mut pfd = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                // A negative fd is ignored by poll: no connection, no hang-up to watch.
                libc::pollfd {
                    fd: peer.as_ref().map_or(-1, |p| p.as_raw_fd()),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if peer.is_some() {
                left.min(SLICE)
            } else {
                left
            };
            // Round up so a sub-millisecond remainder does not become a busy 0 ms poll.
            let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: `pfd` is an array of two valid pollfds that lives across the call, and
            // `peer` keeps the socket's fd open until it returns.
            let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
            drop(peer);
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    return Ok(false);
                }
                return Err(e.into());
            }
            if pfd[0].revents & libc::POLLIN != 0 {
                return match self.call.read() {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                    Err(e) => Err(e.into()),
                };
            }
            if pfd[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    format!(
                        "queue {}: the backend disconnected (its vhost-user socket closed)",
                        self.index
                    ),
                )));
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }
}

pub(crate) fn chain_desc(seg: &ChainSeg, next: Option<u16>) -> Desc {
    let mut flags = if seg.write {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    if next.is_some() {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    Desc {
        addr: seg.addr,
        len: seg.len,
        flags,
        next: next.unwrap_or(0),
    }
}

/// virtio's `vring_need_event`: whether `event` lies in `[old, new)` modulo 2^16.
pub(crate) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec() {
        // The device wants a kick once the driver passes avail_event.
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 5, 0), "entry 5 not yet published");
        assert!(need_event(4, 5, 0));
        assert!(
            !need_event(3, 10, 5),
            "event already passed before this batch"
        );
        assert!(need_event(0xffff, 2, 0xfffe), "wraps");
    }

    #[test]
    fn rings_publish_and_reap() {
        let mem = GuestMem::with_size(1 << 20).unwrap();
        let mut q = Queue::new(&mem, 0, 8).unwrap();
        assert!(Queue::new(&mem, 1, 6).is_err());
        let ids = q.alloc_descs(3).unwrap();
        assert_eq!(ids, vec![0, 1, 2]);
        q.write_chain(
            &ids,
            &[
                ChainSeg {
                    addr: 0x1000,
                    len: 16,
                    write: false,
                },
                ChainSeg {
                    addr: 0x2000,
                    len: 512,
                    write: true,
                },
                ChainSeg {
                    addr: 0x3000,
                    len: 1,
                    write: true,
                },
            ],
        )
        .unwrap();
        assert_eq!(q.read_desc(0).unwrap(), Desc::readable(0x1000, 16).then(1));
        assert_eq!(q.read_desc(2).unwrap(), Desc::writable(0x3000, 1));
        q.push_avail(&[0, 9]).unwrap();
        assert_eq!(
            mem.load_u16(q.avail_gpa() + 2, Ordering::Relaxed).unwrap(),
            2
        );
        assert_eq!(
            mem.load_u16(q.avail_gpa() + 6, Ordering::Relaxed).unwrap(),
            9
        );
        // Play device: one used element.
        mem.write(q.used_gpa() + 4, &[0, 0, 0, 0, 5, 0, 0, 0])
            .unwrap();
        mem.store_u16(q.used_gpa() + 2, 1, Ordering::Release)
            .unwrap();
        assert_eq!(q.poll_used().unwrap(), vec![UsedElem { id: 0, len: 5 }]);
        assert!(q.poll_used().unwrap().is_empty());
        let err = q.wait_used(Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        // A used idx beyond the ring size is the device's fault, reported as such.
        mem.store_u16(q.used_gpa() + 2, 11, Ordering::Release)
            .unwrap();
        assert!(matches!(q.poll_used(), Err(Error::Protocol(_))));
    }
}
