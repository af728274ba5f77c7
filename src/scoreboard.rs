//! The scoreboard: a table in `MAP_SHARED` memory through which workers tell
//! the master that they are alive and how much they have served, with no
//! descriptor and no syscall per beat; and through which workers count the
//! live connections of each source address across the whole pool
//! (`max_connections_per_ip`).
//!
//! Runs in: the master (maps it once, before the first fork; reads it every
//! tick) and every prefork worker (writes its own slot only).
//!
//! Also the **doorbell** of accept balancing: one `eventfd` the master makes
//! with the mapping, inherited by every worker. A worker that is ahead of
//! the others in open connections stops accepting for a moment and rings
//! it, so that those no longer ahead come back: the epoll worker only when
//! no other worker is listening, the io_uring worker at every pass (see
//! [`crate::worker`], "Balancing accepts", and [`crate::uring`]).
//!
//! Owns: one anonymous shared mapping and the doorbell. The mapping must be
//! `MAP_SHARED` and made before `fork()`: a private mapping (or a `memmap2`
//! anonymous map) would become a copy-on-write copy in each child, and the
//! master would never see a worker's writes.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};
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
    /// Whether the worker takes new connections: a [`Taking`] as `u8`.
    taking: AtomicU8,
}

/// Whether a worker takes new connections, for the others' balancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Taking {
    /// Full, out of descriptors, draining, or not started.
    No = 0,
    /// Ahead of the others: it leaves new connections to them for a
    /// moment, and still counts as a candidate.
    Passing = 1,
    /// Its listeners are armed: a new connection may wake it.
    Listening = 2,
}

/// What a worker sees of the others when it balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Others {
    /// The fewest open connections among the candidates (passing or
    /// listening); `None` if there is no candidate.
    pub fewest: Option<u32>,
    /// Whether one of them is listening.
    pub listening: bool,
}

/// Buckets per hash in a worker's per-address table.
const IP_BUCKETS: usize = 1024;

/// A worker's count of live connections per source address, as two
/// count-min rows: an address adds one to a bucket of each row, chosen by
/// two independent keyed hashes. The estimate for an address (the smaller
/// of its two buckets, summed over live workers) is never below the truth;
/// it is above it only if other addresses collide with it in both rows.
#[repr(C)]
struct IpTable {
    rows: [[AtomicU32; IP_BUCKETS]; 2],
}

/// The layout of the shared mapping.
#[repr(C)]
struct Shared {
    cells: [Cell; SLOTS],
    /// Bit `i` set: slot `i` belongs to a live worker (set at claim,
    /// cleared at release, by the master).
    live: [AtomicU64; SLOTS / 64],
    /// The per-address tables, one per slot.
    ips: [IpTable; SLOTS],
}

/// Where an address's connections are counted: one bucket per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpKey([u16; 2]);

/// The shared table.
///
/// Invariant: `shared` points to one `Shared` in a shared mapping that
/// lives as long as the process (it is never unmapped: children inherit it
/// and the master needs it until exit).
pub struct Scoreboard {
    shared: NonNull<Shared>,
    free: Vec<usize>,
    /// Keys of the address hashes, random per master (so a client cannot
    /// choose addresses that collide), copied into every worker at fork.
    seed: [u64; 2],
    /// The doorbell (non-blocking); `None` in a connection child, which
    /// closed it after fork.
    doorbell: Option<EventFd>,
}

impl Scoreboard {
    /// Maps the table. Call once, in the master, before forking.
    pub fn new() -> nix::Result<Scoreboard> {
        let len = NonZeroUsize::new(std::mem::size_of::<Shared>())
            .expect("the scoreboard has a non-zero size");
        // SAFETY: a fresh anonymous mapping aliases no Rust object; the
        // kernel zero-fills it, and all-zero bytes are a valid `Shared`
        // (atomic integers and bools, all 0/false). Pages are allocated on
        // first touch: only the slots in use cost memory.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        let doorbell = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Scoreboard {
            shared: ptr.cast(),
            free: (0..SLOTS).rev().collect(),
            seed: [random_u64(), random_u64()],
            doorbell: Some(doorbell),
        })
    }

    /// The doorbell, for a worker's epoll set (edge-triggered: every ring
    /// is one event, and nobody needs to read the counter).
    pub fn doorbell(&self) -> Option<BorrowedFd<'_>> {
        self.doorbell.as_ref().map(|d| d.as_fd())
    }

    /// Rings the doorbell: every worker waiting on it wakes once.
    pub fn ring(&self) {
        if let Some(d) = &self.doorbell {
            // Fails only once the counter, which nobody reads, would pass
            // 2^64 - 2: after more rings than a worker's life holds.
            let _ = d.write(1);
        }
    }

    /// Closes the doorbell (a connection child has no use for it).
    pub fn close_doorbell(&mut self) {
        self.doorbell = None;
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
        cell.taking.store(Taking::No as u8, Ordering::Relaxed);
        for row in &self.shared().ips[slot].rows {
            for bucket in row {
                bucket.store(0, Ordering::Relaxed);
            }
        }
        self.shared().live[slot / 64].fetch_or(1 << (slot % 64), Ordering::Release);
        Some(slot)
    }

    /// Returns a slot once its worker has been reaped.
    pub fn release(&mut self, slot: usize) {
        debug_assert!(slot < SLOTS && !self.free.contains(&slot));
        // A worker that died without closing its connections leaves counts
        // behind: they stop counting here, and are zeroed at the next claim.
        self.shared().live[slot / 64].fetch_and(!(1 << (slot % 64)), Ordering::Release);
        self.free.push(slot);
    }

    fn shared(&self) -> &Shared {
        // SAFETY: `shared` points to an initialised `Shared` for the life of
        // the process (see the type's invariant); it is only ever accessed
        // through atomics, so shared references across processes are sound.
        unsafe { self.shared.as_ref() }
    }

    /// The cell of `slot`.
    pub fn cell(&self, slot: usize) -> &Cell {
        &self.shared().cells[slot]
    }

    /// Where `ip`'s connections are counted.
    pub fn ip_key(&self, ip: IpAddr) -> IpKey {
        let bytes = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        let hash = |seed: u64| (mix(mix(seed ^ word(0)) ^ word(8)) as usize % IP_BUCKETS) as u16;
        IpKey([hash(self.seed[0]), hash(self.seed[1])])
    }

    /// Counts one more connection of `key` in `slot`'s table.
    pub fn ip_add(&self, slot: usize, key: IpKey) {
        let t = &self.shared().ips[slot];
        for (row, b) in t.rows.iter().zip(key.0) {
            row[usize::from(b)].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Counts one connection of `key` fewer in `slot`'s table.
    pub fn ip_sub(&self, slot: usize, key: IpKey) {
        let t = &self.shared().ips[slot];
        for (row, b) in t.rows.iter().zip(key.0) {
            let _ = row[usize::from(b)].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
        }
    }

    /// Live connections of `key` across every live worker (an estimate
    /// never below the truth).
    pub fn ip_total(&self, key: IpKey) -> u32 {
        let shared = self.shared();
        let mut sums = [0u32; 2];
        for (word_index, word) in shared.live.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let slot = word_index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                for (r, b) in key.0.iter().enumerate() {
                    sums[r] += shared.ips[slot].rows[r][usize::from(*b)].load(Ordering::Acquire);
                }
            }
        }
        sums[0].min(sums[1])
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

    /// The other workers that take new connections and beat at or after
    /// `fresh_since` (a stopped or hung worker does not count).
    pub fn others(&self, slot: usize, fresh_since: u64) -> Others {
        let shared = self.shared();
        let mut others = Others::default();
        for (word_index, word) in shared.live.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let other = word_index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let cell = &shared.cells[other];
                let taking = cell.taking.load(Ordering::Relaxed);
                if other == slot
                    || taking == Taking::No as u8
                    || cell.heartbeat_ms.load(Ordering::Relaxed) < fresh_since.max(1)
                {
                    continue;
                }
                let open = cell.open.load(Ordering::Relaxed);
                others.fewest = Some(others.fewest.map_or(open, |f| f.min(open)));
                others.listening |= taking == Taking::Listening as u8;
            }
        }
        others
    }
}

impl Cell {
    /// Records one loop turn of the worker.
    pub fn beat(&self, now_ms: u64, open: usize) {
        self.heartbeat_ms.store(now_ms.max(1), Ordering::Relaxed);
        self.open.store(open as u32, Ordering::Relaxed);
    }

    /// Publishes the open count at once (an accept or a close), so that a
    /// worker balancing a burst of connections sees it before this worker's
    /// next beat.
    pub fn set_open(&self, open: usize) {
        self.open.store(open as u32, Ordering::Relaxed);
    }

    /// Says whether the worker takes new connections.
    pub fn set_taking(&self, taking: Taking) {
        self.taking.store(taking as u8, Ordering::Relaxed);
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

/// The splitmix64 finaliser: every input bit affects every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// 64 random bits from the kernel (`getrandom`), or the clock if that fails.
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        now_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id())
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

    #[test]
    fn per_address_counts_sum_over_live_workers_only() {
        let mut b = Scoreboard::new().unwrap();
        let (w1, w2) = (b.claim().unwrap(), b.claim().unwrap());
        let a = b.ip_key("127.0.0.2".parse().unwrap());
        let other = b.ip_key("127.0.0.3".parse().unwrap());
        b.ip_add(w1, a);
        b.ip_add(w2, a);
        b.ip_add(w2, a);
        assert_eq!(b.ip_total(a), 3);
        b.ip_sub(w2, a);
        assert_eq!(b.ip_total(a), 2);
        // An address never seen counts 0 unless it collides in both rows.
        if other.0[0] != a.0[0] || other.0[1] != a.0[1] {
            assert_eq!(b.ip_total(other), 0);
        }
        // A worker that died holding connections stops counting.
        b.release(w1);
        assert_eq!(b.ip_total(a), 1);
        // And its table is clean for the next worker.
        let again = b.claim().unwrap();
        assert_eq!(again, w1);
        assert_eq!(b.ip_total(a), 1);
    }

    #[test]
    fn neighbouring_addresses_land_in_different_buckets() {
        let b = Scoreboard::new().unwrap();
        let keys: Vec<IpKey> = (1..=50u8)
            .map(|i| b.ip_key(std::net::Ipv4Addr::new(127, 0, 0, i).into()))
            .collect();
        // Both rows colliding for two of 50 neighbours would be a broken
        // hash (chance with a good one: about 50*49/2 / 1024^2).
        for (i, a) in keys.iter().enumerate() {
            for c in &keys[i + 1..] {
                assert!(a.0[0] != c.0[0] || a.0[1] != c.0[1], "{a:?} {c:?}");
            }
        }
    }

    #[test]
    fn others_are_the_fresh_live_workers_that_take_connections() {
        let mut b = Scoreboard::new().unwrap();
        let (me, w1, w2) = (b.claim().unwrap(), b.claim().unwrap(), b.claim().unwrap());
        let none = Others {
            fewest: None,
            listening: false,
        };
        assert_eq!(b.others(me, 0), none, "nobody has beaten yet");
        b.cell(me).beat(100, 0);
        b.cell(me).set_taking(Taking::Listening);
        assert_eq!(b.others(me, 0), none, "not counting itself");
        b.cell(w1).beat(100, 7);
        b.cell(w1).set_taking(Taking::Passing);
        b.cell(w2).beat(100, 3);
        b.cell(w2).set_taking(Taking::No);
        assert_eq!(
            b.others(me, 0),
            Others {
                fewest: Some(7),
                listening: false
            }
        );
        b.cell(w2).set_taking(Taking::Listening);
        b.cell(w2).set_open(2);
        assert_eq!(
            b.others(me, 0),
            Others {
                fewest: Some(2),
                listening: true
            }
        );
        // Heartbeats before `fresh_since` and released slots do not count.
        assert_eq!(b.others(me, 101), none);
        b.release(w2);
        assert_eq!(b.others(me, 0).fewest, Some(7));
    }

    #[test]
    fn a_ring_is_one_edge_for_every_worker_waiting_on_the_doorbell() {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        let mut b = Scoreboard::new().unwrap();
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        let workers: Vec<Epoll> = (0..2)
            .map(|i| {
                let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
                ep.add(b.doorbell().unwrap(), EpollEvent::new(flags, i))
                    .unwrap();
                ep
            })
            .collect();
        let mut events = [EpollEvent::empty(); 4];
        let mut heard = |ep: &Epoll| ep.wait(&mut events, 0u16).unwrap();
        assert!(workers.iter().all(|ep| heard(ep) == 0), "no ring yet");
        b.ring();
        // Every worker hears the ring, once: an edge, never read.
        assert!(workers.iter().all(|ep| heard(ep) == 1));
        assert!(workers.iter().all(|ep| heard(ep) == 0));
        b.ring();
        assert!(workers.iter().all(|ep| heard(ep) == 1));
        // A connection child closes it; ringing then does nothing.
        b.close_doorbell();
        assert!(b.doorbell().is_none());
        b.ring();
    }

    #[test]
    fn ipv4_and_its_mapped_ipv6_form_count_together() {
        let b = Scoreboard::new().unwrap();
        let v4 = b.ip_key("10.1.2.3".parse().unwrap());
        let mapped = b.ip_key("::ffff:10.1.2.3".parse().unwrap());
        assert_eq!(v4, mapped);
    }
}
