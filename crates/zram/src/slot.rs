//! The slot table entry: 16 bytes per page, like the kernel's.
//!
//! `data` holds the zsmalloc handle, the same-filled word, or the backing-file block.
//! `meta` packs the state, the compressed length, the algorithm priority, the flags, the slot
//! lock bit and the last access time (seconds since the device was made).
//!
//! The slot lock is a bit in `meta`. It is *sleepable*: its holder may decompress or read the
//! backing file (a waiter spins briefly, then yields), so it carries no `preempt` guard. It is
//! never held while another slot's lock is taken, and never across compression of new data on
//! the page-write path (only partial-page writes and maintenance, which must keep the page
//! stable, compress under it).
//!
//! Both words are one 16-byte atomic, and unlocking stores the new entry whole, in one
//! instruction (`cmpxchg16b`, or an aligned AVX store): when the slot table lives in a file
//! (`--state-dir`), a process killed at any instruction leaves every slot old or new, never a
//! new handle beside an old length or algorithm. The store is a Release: the object it names
//! was written before it.

use portable_atomic::AtomicU128;
use std::sync::atomic::Ordering::*;

const LEN_MASK: u64 = 0x1FFF;
const STATE_SHIFT: u32 = 13;
const STATE_MASK: u64 = 0x7 << STATE_SHIFT;
const PRIO_SHIFT: u32 = 16;
const PRIO_MASK: u64 = 0x3 << PRIO_SHIFT;
pub const IDLE: u64 = 1 << 18;
pub const INCOMPRESSIBLE: u64 = 1 << 19;
const LOCK: u64 = 1 << 20;
/// Set by maintenance (recompression, writeback) when it copies a page out to work on it
/// unlocked; every install clears it. Maintenance installs its result only if the flag is
/// still set: a handle id alone cannot tell, since a rewrite may get the same id back.
pub const MAINT: u64 = 1 << 21;
const ATIME_SHIFT: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Empty = 0,
    /// A page of one repeated 8-byte word, kept in `data`.
    Same = 1,
    /// Compressed object of `len` bytes in the pool.
    Compressed = 2,
    /// Raw page in the pool (compression did not pay).
    Huge = 3,
    /// In the backing file at block `data`: compressed (`len` < 4096) or raw.
    WrittenBack = 4,
}

/// An unlocked copy of a slot's two words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub data: u64,
    pub meta: u64,
}

impl Entry {
    pub const EMPTY: Entry = Entry { data: 0, meta: 0 };

    pub fn new(state: State, data: u64, len: usize, prio: u8) -> Entry {
        Entry {
            data,
            meta: (state as u64) << STATE_SHIFT
                | (len as u64 & LEN_MASK)
                | (prio as u64) << PRIO_SHIFT,
        }
    }

    pub fn state(&self) -> State {
        self.state_checked().unwrap_or(State::WrittenBack)
    }

    /// The state, or `None` for the three bit patterns no entry is made with (only a damaged
    /// or foreign state file holds them).
    pub fn state_checked(&self) -> Option<State> {
        Some(match (self.meta & STATE_MASK) >> STATE_SHIFT {
            0 => State::Empty,
            1 => State::Same,
            2 => State::Compressed,
            3 => State::Huge,
            4 => State::WrittenBack,
            _ => return None,
        })
    }

    pub fn len(&self) -> usize {
        (self.meta & LEN_MASK) as usize
    }

    pub fn prio(&self) -> u8 {
        ((self.meta & PRIO_MASK) >> PRIO_SHIFT) as u8
    }

    pub fn has(&self, flag: u64) -> bool {
        self.meta & flag != 0
    }

    pub fn atime(&self) -> u32 {
        (self.meta >> ATIME_SHIFT) as u32
    }

    /// Same content and place, whatever the flags and access time say.
    pub fn same_object(&self, other: &Entry) -> bool {
        let key = LEN_MASK | STATE_MASK | PRIO_MASK;
        self.data == other.data && self.meta & key == other.meta & key
    }
}

/// `data` in the low 64 bits, `meta` in the high.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct Slot(AtomicU128);

// SAFETY: every bit pattern is a valid AtomicU128; all-zero is the empty, unlocked slot.
unsafe impl region::Zeroable for Slot {}

/// Whether slots are updated whole by one instruction here (see the module doc); without it
/// (no `cmpxchg16b`) they are correct in memory but not crash-safe in a file.
pub fn updates_are_atomic() -> bool {
    AtomicU128::is_lock_free()
}

impl Entry {
    fn pack(self) -> u128 {
        (self.meta as u128) << 64 | self.data as u128
    }

    fn unpack(v: u128) -> Entry {
        Entry {
            data: v as u64,
            meta: (v >> 64) as u64,
        }
    }
}

/// A locked slot. Dropping it unlocks.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    slot: &'a Slot,
    pub entry: Entry,
}

impl Slot {
    pub fn lock(&self) -> SlotGuard<'_> {
        let mut backoff = preempt::Backoff::new();
        loop {
            let v = self.0.load(Relaxed);
            let entry = Entry::unpack(v);
            if entry.meta & LOCK == 0 {
                let locked = Entry {
                    meta: entry.meta | LOCK,
                    ..entry
                };
                if self
                    .0
                    .compare_exchange_weak(v, locked.pack(), Acquire, Relaxed)
                    .is_ok()
                {
                    return SlotGuard { slot: self, entry };
                }
            } else {
                backoff.snooze();
            }
        }
    }
}

impl Slot {
    /// Locks the slot if nobody holds it; never waits. Cold-page scans use it: a page
    /// someone holds is being used, so not cold, and a scan must not wait on it.
    pub fn try_lock(&self) -> Option<SlotGuard<'_>> {
        let v = self.0.load(Relaxed);
        let entry = Entry::unpack(v);
        if entry.meta & LOCK != 0 {
            return None;
        }
        let locked = Entry {
            meta: entry.meta | LOCK,
            ..entry
        };
        self.0
            .compare_exchange(v, locked.pack(), Acquire, Relaxed)
            .ok()
            .map(|_| SlotGuard { slot: self, entry })
    }

    /// The entry, without locking: recovery (before anyone else can see the slot), and scans
    /// that only look for candidates (a candidate is locked and checked again).
    pub fn peek(&self) -> Entry {
        Entry::unpack(self.0.load(Acquire))
    }

    /// Recovery: drops the lock and maintenance mark a dead process may have left; returns
    /// the entry.
    pub fn reset(&self) -> Entry {
        let mut e = self.peek();
        e.meta &= !(LOCK | MAINT);
        self.0.store(e.pack(), Release);
        e
    }
}

impl SlotGuard<'_> {
    /// Installs a new object (flags cleared) and stamps the access time.
    pub fn set(&mut self, new: Entry, now: u32) {
        self.entry = Entry {
            data: new.data,
            meta: new.meta | (now as u64) << ATIME_SHIFT,
        };
    }

    pub fn set_flag(&mut self, flag: u64, on: bool) {
        if on {
            self.entry.meta |= flag;
        } else {
            self.entry.meta &= !flag;
        }
    }

    pub fn touch(&mut self, now: u32) {
        self.entry.meta =
            self.entry.meta & !(u64::MAX << ATIME_SHIFT) | (now as u64) << ATIME_SHIFT;
        self.entry.meta &= !IDLE;
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let e = Entry {
            meta: self.entry.meta & !LOCK,
            ..self.entry
        };
        self.slot.0.store(e.pack(), Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_sixteen_bytes_updated_at_once() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        assert!(updates_are_atomic(), "no 16-byte atomics on this machine");
    }

    #[test]
    fn entries_round_trip_their_fields() {
        let e = Entry::new(State::Compressed, 77, 4095, 3);
        assert_eq!(
            (e.state(), e.data, e.len(), e.prio()),
            (State::Compressed, 77, 4095, 3)
        );
        let s = Slot::default();
        {
            let mut g = s.lock();
            assert_eq!(g.entry, Entry::EMPTY);
            g.set(e, 1234);
            g.set_flag(IDLE, true);
        }
        let g = s.lock();
        assert!(g.entry.same_object(&e));
        assert!(g.entry.has(IDLE));
        assert_eq!(g.entry.atime(), 1234);
        assert_eq!(g.entry.state(), State::Compressed);
        assert!(s.try_lock().is_none(), "held");
        drop(g);
        assert!(s.try_lock().unwrap().entry.same_object(&e));
    }

    #[test]
    fn the_lock_excludes_other_threads() {
        let s = Slot::default();
        let counter = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    for _ in 0..10_000 {
                        let mut g = s.lock();
                        // A non-atomic read-modify-write of the slot's data under the lock.
                        g.entry.data += 1;
                        counter.fetch_add(1, Relaxed);
                    }
                });
            }
        });
        assert_eq!(s.lock().entry.data, counter.load(Relaxed));
    }
}
