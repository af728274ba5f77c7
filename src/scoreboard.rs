//! The scoreboard: a table in `MAP_SHARED` memory through which workers tell
//! the master that they are alive and how much they have served, with no
//! descriptor and no syscall per beat.
//!
//! Runs in: the master (maps it once, before the first fork; reads it every
//! tick) and every prefork worker (writes its own slot only).
//!
//! Owns: one anonymous shared mapping. It must be `MAP_SHARED` and made
//! before `fork()`: a private mapping (or a `memmap2` anonymous map) would
//! become a copy-on-write copy in each child, and the master would never see
//! a worker's writes.

use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

/// How many workers can have a slot at once (live workers of every
/// generation, draining ones included). A worker spawned when all are taken
/// runs without heartbeat supervision, and the master says so in its log.
pub const SLOTS: usize = 1024;

/// One worker's cell. Written only by the worker that owns it (and reset by
/// the master before a new worker gets it); read by the master.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Cell {
    /// CLOCK_MONOTONIC milliseconds of the worker's last loop turn; 0 until
    /// the worker is up and accepting.
    heartbeat_ms: AtomicU64,
    /// Connections accepted since the worker started.
    served: AtomicU64,
    /// Connections open now.
    open: AtomicU32,
    /// The worker served `max_requests_per_worker` connections and asks to
    /// be recycled.
    wants_retire: AtomicBool,
}

/// The shared table.
///
/// Invariant: `cells` points to `SLOTS` cells in a shared mapping that lives
/// as long as the process (it is never unmapped: children inherit it and the
/// master needs it until exit).
pub struct Scoreboard {
    cells: NonNull<Cell>,
    free: Vec<usize>,
}

impl Scoreboard {
    /// Maps the table. Call once, in the master, before forking.
    pub fn new() -> nix::Result<Scoreboard> {
        let len = NonZeroUsize::new(SLOTS * std::mem::size_of::<Cell>())
            .expect("the scoreboard has a non-zero size");
        // SAFETY: a fresh anonymous mapping aliases no Rust object; the
        // kernel zero-fills it, and all-zero bytes are a valid `Cell` (atomic
        // integers and a bool, all false/0).
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(Scoreboard {
            cells: ptr.cast(),
            free: (0..SLOTS).rev().collect(),
        })
    }

    /// Takes a free slot for a new worker and resets it; `None` if all are
    /// taken.
    pub fn claim(&mut self) -> Option<usize> {
        let slot = self.free.pop()?;
        let cell = self.cell(slot);
        cell.heartbeat_ms.store(0, Ordering::Relaxed);
        cell.served.store(0, Ordering::Relaxed);
        cell.open.store(0, Ordering::Relaxed);
        cell.wants_retire.store(false, Ordering::Relaxed);
        Some(slot)
    }

    /// Returns a slot once its worker has been reaped.
    pub fn release(&mut self, slot: usize) {
        debug_assert!(slot < SLOTS && !self.free.contains(&slot));
        self.free.push(slot);
    }

    /// The cell of `slot`.
    pub fn cell(&self, slot: usize) -> &Cell {
        assert!(slot < SLOTS);
        // SAFETY: `cells` points to SLOTS initialised cells (see the type's
        // invariant) and `slot < SLOTS`; cells are only ever accessed through
        // atomics, so shared references across processes are sound.
        unsafe { &*self.cells.as_ptr().add(slot) }
    }

    /// The last heartbeat of `slot` (0 if the worker has not started yet).
    pub fn heartbeat(&self, slot: usize) -> u64 {
        self.cell(slot).heartbeat_ms.load(Ordering::Relaxed)
    }

    /// Whether the worker in `slot` asks to be recycled.
    pub fn wants_retire(&self, slot: usize) -> bool {
        self.cell(slot).wants_retire.load(Ordering::Relaxed)
    }

    /// Open connections of the worker in `slot`.
    pub fn open(&self, slot: usize) -> u32 {
        self.cell(slot).open.load(Ordering::Relaxed)
    }
}

impl Cell {
    /// Records one loop turn of the worker.
    pub fn beat(&self, now_ms: u64, open: usize) {
        self.heartbeat_ms.store(now_ms.max(1), Ordering::Relaxed);
        self.open.store(open as u32, Ordering::Relaxed);
    }

    /// Counts one accepted connection; returns the new total.
    pub fn served_one(&self) -> u64 {
        self.served.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Asks the master to recycle this worker.
    pub fn ask_retire(&self) {
        self.wants_retire.store(true, Ordering::Relaxed);
    }
}

/// Milliseconds of CLOCK_MONOTONIC_COARSE: one vDSO read, no syscall, a few
/// milliseconds of resolution, which is all timeouts and heartbeats need.
/// The same clock in every process, so the master can compare a worker's
/// heartbeat with its own time.
pub fn now_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_claimed_reset_and_released() {
        let mut b = Scoreboard::new().unwrap();
        let s = b.claim().unwrap();
        b.cell(s).beat(5, 2);
        b.cell(s).ask_retire();
        assert_eq!(b.heartbeat(s), 5);
        assert_eq!(b.open(s), 2);
        assert!(b.wants_retire(s));
        b.release(s);
        let again = b.claim().unwrap();
        assert_eq!(again, s);
        assert_eq!(b.heartbeat(s), 0);
        assert!(!b.wants_retire(s));
    }
}
