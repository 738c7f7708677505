//! One virtqueue of a connection: the ring's state, which vhost-user messages set, and the
//! worker thread that serves it.
//!
//! The worker sleeps in poll(2) on the queue's kick eventfd and a wake eventfd of ours (new
//! kick fd, exit). It holds the ring's lock while it serves requests, so a message that
//! stops the ring (GET_VRING_BASE) returns only after the requests in flight completed, and
//! completions are always in order: a chain's used entry is written before the next chain is
//! popped.
//!
//! Notifiers are the frontend's eventfds, made non-blocking: writing the call fd can fail
//! (counter full) but never block, so a frontend cannot stall its worker through them.

use crate::blk::RequestHandler;
use crate::connection::Shared;
use parking_lot::Mutex;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The ring state of one queue.
#[derive(Debug)]
pub(crate) struct Ring {
    pub queue: Queue,
    pub kick: Option<Arc<File>>,
    pub call: Option<File>,
    pub err: Option<File>,
    /// SET_VRING_ENABLE (or always, without VHOST_USER_F_PROTOCOL_FEATURES).
    pub enabled: bool,
    /// Between SET_VRING_KICK and GET_VRING_BASE.
    pub started: bool,
    /// The ring was found corrupt; not served again until it is stopped or the device reset.
    pub broken: bool,
    /// Set when the ring starts: the first pass signals the guest even if it completes
    /// nothing. A backend that died (a crash, `--state-dir`) may have added used entries it
    /// never signalled; with EVENT_IDX the driver's `used_event` then lies behind the ring's
    /// used index and no later completion would ever cross it: the guest would wait for ever.
    /// One spurious interrupt per start is harmless.
    pub announce: bool,
}

impl Ring {
    fn serving(&self) -> bool {
        self.started && self.enabled && !self.broken && self.queue.ready()
    }

    /// Tells the frontend something is wrong with this ring (its err eventfd, if it gave one).
    fn signal_err(&self) {
        if let Some(mut err) = self.err.as_ref() {
            let _ = err.write(&1u64.to_ne_bytes());
        }
    }
}

/// A queue as its worker and the connection share it.
#[derive(Debug)]
pub(crate) struct VringShared {
    pub index: usize,
    pub ring: Mutex<Ring>,
    wake: EventFd,
    exit: AtomicBool,
}

impl VringShared {
    pub fn new(index: usize, max_size: u16) -> io::Result<VringShared> {
        Ok(VringShared {
            index,
            ring: Mutex::new(Ring {
                queue: Queue::new(max_size).map_err(|e| io::Error::other(e.to_string()))?,
                kick: None,
                call: None,
                err: None,
                enabled: false,
                started: false,
                broken: false,
                announce: false,
            }),
            wake: EventFd::new(EFD_NONBLOCK)?,
            exit: AtomicBool::new(false),
        })
    }

    /// Makes the worker look at the ring again (new kick fd, ring started or enabled).
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// A running worker thread.
#[derive(Debug)]
pub(crate) struct WorkerThread {
    vring: Arc<VringShared>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    pub fn spawn(vring: Arc<VringShared>, conn: Arc<Shared>) -> io::Result<WorkerThread> {
        let name = format!("{}-q{}", conn.served.name, vring.index);
        let thread = {
            let vring = vring.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || run(&vring, &conn))?
        };
        Ok(WorkerThread {
            vring,
            thread: Some(thread),
        })
    }
}

impl Drop for WorkerThread {
    /// Ends the thread: it finishes the request it is serving, then returns.
    fn drop(&mut self) {
        self.vring.exit.store(true, Ordering::Release);
        self.vring.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(vring: &VringShared, conn: &Shared) {
    let mut worker = RequestHandler::new(conn.served.clone(), vring.index, conn.blk.clone());
    loop {
        // Keep the kick fd open while polling it, even if a message replaces it meanwhile
        // (the replacement wakes us through `wake`).
        let kick = vring.ring.lock().kick.clone();
        let mut fds = [
            libc::pollfd {
                fd: vring.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: kick.as_ref().map_or(-1, |k| k.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries (a negative fd is ignored by poll).
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            log::error!(
                "{} queue {}: poll failed: {}",
                conn.served.name,
                vring.index,
                io::Error::last_os_error()
            );
            conn.fail("a queue worker cannot wait for requests");
            return;
        }
        // Drain the wake-up before looking at `exit`: draining it after would swallow an
        // exit request made in between, and the next poll would sleep for ever.
        let _ = vring.wake.read();
        if vring.exit.load(Ordering::Acquire) {
            return;
        }
        if let Some(mut k) = kick.as_deref() {
            // Non-blocking (set when the fd was accepted); empty is fine.
            let _ = k.read(&mut [0u8; 8]);
        }
        if !serve(vring, conn, &mut worker) {
            return;
        }
    }
}

/// Serves every available chain, then re-arms notifications. False if the connection must
/// end (its guest memory vanished).
fn serve(vring: &VringShared, conn: &Shared, worker: &mut RequestHandler) -> bool {
    let mem = conn.mem.memory();
    let name = &conn.served.name;
    let q = vring.index;
    let mut ring = vring.ring.lock();
    let broken = |ring: &mut Ring, why: &dyn std::fmt::Display| {
        log::error!(
            "{name} queue {q}: broken ring ({why}); queue stopped until the guest resets it"
        );
        ring.broken = true;
        ring.signal_err();
    };
    if !ring.serving() {
        return true;
    }
    let event_idx = ring.queue.event_idx_enabled();
    loop {
        if event_idx && let Err(e) = ring.queue.disable_notification(&*mem) {
            broken(&mut ring, &e);
            return true;
        }
        let mut completed = 0u32;
        loop {
            let size = ring.queue.size();
            let chain = match ring.queue.iter(&*mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    broken(&mut ring, &e);
                    return true;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if head >= size {
                broken(
                    &mut ring,
                    &format_args!("head index {head} >= queue size {size}"),
                );
                return true;
            }
            let len = worker.process(chain);
            if conn.memory_faulted() {
                // The request ran on guest memory that is gone: complete nothing, end the
                // connection.
                return false;
            }
            if let Err(e) = ring.queue.add_used(&*mem, head, len) {
                broken(&mut ring, &e);
                return true;
            }
            completed += 1;
        }
        let notify = match completed {
            0 => Ok(false),
            _ => ring.queue.needs_notification(&*mem),
        };
        let notify = match std::mem::take(&mut ring.announce) {
            true => notify.map(|_| true),
            false => notify,
        };
        match notify {
            Ok(true) => {
                if let Some(mut call) = ring.call.as_ref() {
                    // Non-blocking: a full counter (never in practice) loses nothing, the guest
                    // finds the completions on its next interrupt.
                    let _ = call.write(&1u64.to_ne_bytes());
                }
            }
            Ok(false) => {}
            Err(e) => {
                broken(&mut ring, &e);
                return true;
            }
        }
        // A guest with requests in flight usually sends the next one within microseconds;
        // watching the ring a little saves the kick and the wake-up on both sides (what
        // QEMU's adaptive polling does). Only after a batch that had work.
        if completed > 0 && !conn.poll.is_zero() && poll_ring(&ring.queue, &mem, conn.poll) {
            continue;
        }
        if !event_idx {
            return true;
        }
        // With EVENT_IDX, a chain made available after the drain but before notifications
        // were re-enabled would get no kick: enable_notification reports it, go again.
        match ring.queue.enable_notification(&*mem) {
            Ok(true) => {}
            Ok(false) => return true,
            Err(e) => {
                broken(&mut ring, &e);
                return true;
            }
        }
    }
}

/// Spins up to `poll` for the driver to make a chain available; true if it did.
fn poll_ring(
    queue: &Queue,
    mem: &vm_memory::GuestMemoryMmap<()>,
    poll: std::time::Duration,
) -> bool {
    let until = Instant::now() + poll;
    loop {
        match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if idx.0 != queue.next_avail() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if Instant::now() >= until {
            return false;
        }
        std::hint::spin_loop();
    }
}
