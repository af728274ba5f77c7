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
//!
//! ## Per-address counts
//! Each slot has its own table of the live connections per source address
//! of its worker, exact: a client is refused only when the connections
//! its address holds, summed over the live workers, reach the cap. (An
//! estimate, such as a count-min sketch in a fixed number of buckets, is
//! not enough: with a thousand distinct addresses per bucket, every new
//! address looks as if it held connections, and is refused.)
//!
//! A table is open addressing with linear probing, one `AtomicU64` per
//! entry packing a 44-bit keyed hash of the address with a 20-bit count
//! (a worker holds at most `max_connections` <= 1,000,000 < 2^20), so a
//! reader never sees a torn entry. Only its worker writes it; the other
//! workers read it at each admission ([`Scoreboard::ip_total`]). An entry
//! whose count falls to 0 stays, as a tombstone that the same address,
//! or a new one probing past it, reuses: entries never move, so a reader
//! probing while the owner writes cannot miss one (backward-shift
//! deletion would move entries under the reader's feet). Tombstones are
//! swept by rebuilding the table into the slot's second table and
//! switching to it with one store of a generation number; a reader that
//! sees the generation change during its probe probes again. No reader
//! ever waits for a writer.
//!
//! Two hashes that agree on all 44 bits share a count (a chance of 2^-44
//! per pair, under keys chosen at random by each master): the shared count
//! can only refuse too early, never let an address past its cap.
//!
//! The tables are sized when the master maps the scoreboard, from its
//! config (see [`addresses_to_count`]), with room for every address a
//! worker may hold at under 5/8 load: two tables of 1.6 to 3.2 entries of
//! 8 bytes per connection a worker may hold, at most 52 bytes in all
//! (above 320 connections: a table has at least 512 entries, so a slot
//! has at least 8 KiB). A
//! worker whose table is full anyway (a reload raised `max_connections`,
//! or set `max_connections_per_ip` with a `max_connections` above 1024,
//! past what the tables were sized for) admits the addresses it cannot
//! count, as long as the other workers' counts allow, and logs it. The
//! mapping is `MAP_NORESERVE` and its pages are allocated on first touch:
//! slots whose workers count no address cost address space only (32 MiB
//! for the 1024 slots with the default `max_connections`), and a worker's
//! tables cost memory as it counts addresses and as the other workers
//! probe them (a page that a probe reads in a shared mapping is allocated
//! too), until its slot is released.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::{madvise, mmap_anonymous, MapFlags, MmapAdvise, ProtFlags};

use crate::config::Config;

/// How many workers can have a slot at once (live workers of every
/// generation, draining ones included). The master spawns no worker while
/// all are taken: it logs that and backs off as after a failed fork, so
/// every worker is supervised.
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

/// The fewest entries a per-address table has: one page of 4 KiB.
const MIN_IP_ENTRIES: usize = 512;
/// Bits of an entry that hold the count; the rest hold the hash's tag.
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// How many distinct addresses each worker's table must count exactly,
/// for `config`: `max_connections` (a worker holds at most that many
/// addresses) when `max_connections_per_ip` is set; otherwise the table is
/// unused until a reload sets it, and is sized for the smaller of
/// `max_connections` and 1024 (the default), so that a pool that does not
/// cap addresses does not reserve address space in proportion to a large
/// `max_connections`.
pub fn addresses_to_count(config: &Config) -> usize {
    if config.max_connections_per_ip > 0 {
        config.max_connections
    } else {
        config.max_connections.min(1024)
    }
}

/// A slot's per-address table header. Written only by the worker that
/// owns the slot (and reset by the master before a new worker gets it).
#[repr(C, align(64))]
#[derive(Default)]
struct IpHead {
    /// Which of the slot's two tables is current: the one numbered
    /// `generation % 2`. Incremented (SeqCst) after each rebuild.
    generation: AtomicU64,
    /// Entries of the current table that are not empty (live or
    /// tombstones): what linear probing's cost depends on. Read by the
    /// owner only.
    used: AtomicU32,
    /// Entries of the current table with a count above 0. Read by the
    /// owner only.
    live: AtomicU32,
}

/// The fixed-size part of the shared mapping; the per-address tables
/// follow it (see [`Scoreboard::table`]).
#[repr(C)]
struct Shared {
    cells: [Cell; SLOTS],
    /// Bit `i` set: slot `i` belongs to a live worker (set at claim,
    /// cleared at release, by the master).
    live: [AtomicU64; SLOTS / 64],
    /// The per-address tables' headers, one per slot.
    ip_heads: [IpHead; SLOTS],
}

/// An address's keyed hash, as counted in the per-address tables; `0`
/// (the default) stands for a connection that is not counted
/// (`max_connections_per_ip` is 0, or the worker's table was full).
///
/// Invariant: a counted key's tag (`key >> COUNT_BITS`) is never 0, so an
/// entry holding it is never 0, the empty entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpKey(u64);

impl IpKey {
    /// Whether the connection is counted.
    pub fn is_counted(self) -> bool {
        self.0 != 0
    }

    fn tag(self) -> u64 {
        self.0 >> COUNT_BITS
    }

    /// Where its probe starts in a table of `entries` (a power of two):
    /// from the tag, which is all an entry keeps, so that a rebuild can
    /// place an entry without knowing its address.
    fn home(self, entries: usize) -> usize {
        self.tag() as usize & (entries - 1)
    }
}

/// The shared table.
///
/// Invariant: `shared` points to one `Shared` in a shared mapping that
/// lives as long as the process (it is never unmapped: children inherit it
/// and the master needs it until exit), followed at `tables` by
/// `2 * SLOTS * ip_entries` zero-initialised `AtomicU64`, in the same
/// mapping.
pub struct Scoreboard {
    shared: NonNull<Shared>,
    tables: NonNull<AtomicU64>,
    /// Entries in each per-address table: a power of two.
    ip_entries: usize,
    free: Vec<usize>,
    /// Keys of the address hash, random per master (so a client cannot
    /// choose addresses that collide), copied into every worker at fork.
    seed: [u64; 2],
    /// The doorbell (non-blocking); `None` in a connection child, which
    /// closed it after fork.
    doorbell: Option<EventFd>,
}

impl Scoreboard {
    /// Maps the table, with per-address tables sized for `config` (see
    /// [`addresses_to_count`]). Call once, in the master, before forking.
    pub fn new(config: &Config) -> nix::Result<Scoreboard> {
        Scoreboard::counting(addresses_to_count(config))
    }

    /// Maps the table, with per-address tables that count `addresses`
    /// distinct addresses per worker exactly.
    pub fn counting(addresses: usize) -> nix::Result<Scoreboard> {
        let page = page_size();
        let head = std::mem::size_of::<Shared>().next_multiple_of(page);
        let mut entries = ip_entries_for(addresses);
        let (ptr, entries) = loop {
            let len = head + 2 * SLOTS * entries * std::mem::size_of::<AtomicU64>();
            let len = NonZeroUsize::new(len).expect("the scoreboard has a non-zero size");
            // SAFETY: a fresh anonymous mapping aliases no Rust object; the
            // kernel zero-fills it, and all-zero bytes are a valid `Shared`
            // followed by valid `AtomicU64`s (atomic integers and bools,
            // all 0/false). Pages are allocated on first touch, and
            // MAP_NORESERVE reserves no swap for the rest: only the slots
            // and tables in use cost memory.
            let mapped = unsafe {
                mmap_anonymous(
                    None,
                    len,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                )
            };
            match mapped {
                Ok(ptr) => break (ptr, entries),
                // Strict overcommit (vm.overcommit_memory = 2) ignores
                // MAP_NORESERVE and charges the whole length: smaller
                // tables count fewer addresses exactly, which beats not
                // starting.
                Err(nix::errno::Errno::ENOMEM) if entries > MIN_IP_ENTRIES => {
                    entries /= 2;
                    log::warn!(
                        "scoreboard: cannot map per-address tables for {addresses} addresses per worker; \
                         trying {} (max_connections_per_ip counts at most that many distinct addresses per worker)",
                        entries * 5 / 8
                    );
                }
                Err(e) => return Err(e),
            }
        };
        let doorbell = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        // SAFETY: `head` is within the mapping just made (its length is
        // `head` plus the tables), and page-aligned, so aligned for u64.
        let tables = unsafe { NonNull::new_unchecked(ptr.as_ptr().cast::<u8>().add(head)) };
        Ok(Scoreboard {
            shared: ptr.cast(),
            tables: tables.cast(),
            ip_entries: entries,
            free: (0..SLOTS).rev().collect(),
            seed: [random_u64(), random_u64()],
            doorbell: Some(doorbell),
        })
    }

    /// How many distinct addresses one worker's table counts exactly.
    pub fn ip_addresses(&self) -> usize {
        self.ip_entries * 5 / 8
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
        self.reset_ip_tables(slot);
        self.shared().live[slot / 64].fetch_or(1 << (slot % 64), Ordering::Release);
        Some(slot)
    }

    /// Returns a slot once its worker has been reaped.
    pub fn release(&mut self, slot: usize) {
        debug_assert!(slot < SLOTS && !self.free.contains(&slot));
        // A worker that died without closing its connections leaves counts
        // behind: they stop counting here, and are zeroed (their memory
        // returned) right after.
        self.shared().live[slot / 64].fetch_and(!(1 << (slot % 64)), Ordering::Release);
        self.reset_ip_tables(slot);
        self.free.push(slot);
    }

    /// Empties `slot`'s per-address tables: a hole punched in the shared
    /// memory (`MADV_REMOVE`: the pages are freed and read as zeros
    /// again), or zeros stored where the tables do not fill whole pages.
    /// Always, not only when the worker wrote them: in a shared mapping a
    /// page that another worker's probe only read is allocated too, which
    /// is also why [`Scoreboard::claim`] empties them again (a probe that
    /// raced the release may have read them since). The slot is not live:
    /// only a worker that read the live bits just before may still probe
    /// these tables, and counts the dead worker's connections or not.
    fn reset_ip_tables(&self, slot: usize) {
        let head = &self.shared().ip_heads[slot];
        {
            let first = self.table(slot, 0);
            let len = 2 * self.ip_entries * std::mem::size_of::<AtomicU64>();
            let page = page_size();
            let start = first.as_ptr() as usize;
            let punched = start % page == 0 && len % page == 0 && {
                // SAFETY: [start, start + len) is exactly this slot's two
                // tables, inside the shared mapping, whole pages; nothing
                // in Rust holds a reference into them beyond atomics, and
                // MADV_REMOVE leaves them mapped, reading as zeros.
                unsafe { madvise(NonNull::from(first).cast(), len, MmapAdvise::MADV_REMOVE) }
                    .is_ok()
            };
            if !punched {
                for t in 0..2 {
                    for e in self.table(slot, t) {
                        e.store(0, Ordering::Relaxed);
                    }
                }
            }
        }
        head.generation.store(0, Ordering::Relaxed);
        head.used.store(0, Ordering::Relaxed);
        head.live.store(0, Ordering::Relaxed);
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

    /// Table `t` (0 or 1) of `slot`.
    fn table(&self, slot: usize, t: usize) -> &[AtomicU64] {
        debug_assert!(slot < SLOTS && t < 2);
        // SAFETY: the tables are `2 * SLOTS * ip_entries` initialised
        // atomics in the shared mapping, which lives as long as the process
        // (the type's invariant); this slice is one of them, in bounds, and
        // only ever accessed through atomics.
        unsafe {
            let first = self.tables.as_ptr().add((2 * slot + t) * self.ip_entries);
            std::slice::from_raw_parts(first, self.ip_entries)
        }
    }

    /// `slot`'s current table.
    fn current_table(&self, slot: usize) -> &[AtomicU64] {
        let generation = self.shared().ip_heads[slot]
            .generation
            .load(Ordering::Relaxed);
        self.table(slot, (generation % 2) as usize)
    }

    /// Where `ip`'s connections are counted (never the uncounted key).
    pub fn ip_key(&self, ip: IpAddr) -> IpKey {
        let bytes = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        let hash = mix(mix(mix(self.seed[0] ^ word(0)) ^ word(8)) ^ self.seed[1]);
        // A tag of 0 would make an entry that reads as empty.
        if hash >> COUNT_BITS == 0 {
            IpKey(hash | 1 << COUNT_BITS)
        } else {
            IpKey(hash)
        }
    }

    /// Counts one more connection of `key` in `slot`'s table, which only
    /// the worker in `slot` may call. Returns `false`, counting nothing,
    /// if the table has no room for another address.
    ///
    /// The count is stored SeqCst, and [`Scoreboard::ip_total`] loads
    /// SeqCst: of two workers that count the same address and then read
    /// the totals, at least one sees both counts (store then load on two
    /// sides, the Dekker pattern; weaker orderings would let each miss the
    /// other's store), so two workers admitting at once cannot both let an
    /// address past its cap.
    pub fn ip_add(&self, slot: usize, key: IpKey) -> bool {
        if !key.is_counted() {
            return false;
        }
        let head = &self.shared().ip_heads[slot];
        let table = self.current_table(slot);
        match probe(table, key) {
            Probe::Found(i, entry) => {
                debug_assert!(entry & COUNT_MASK < COUNT_MASK);
                table[i].store(entry + 1, Ordering::SeqCst);
                if entry & COUNT_MASK == 0 {
                    head.live.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            // A new address: counted if fewer than `ip_addresses()` are.
            _ if head.live.load(Ordering::Relaxed) as usize >= self.ip_addresses() => false,
            Probe::Tombstone(i) => {
                table[i].store(key.tag() << COUNT_BITS | 1, Ordering::SeqCst);
                head.live.fetch_add(1, Ordering::Relaxed);
                true
            }
            Probe::Empty(i) => {
                let used = head.used.load(Ordering::Relaxed) as usize;
                if used < self.ip_entries * 3 / 4 {
                    table[i].store(key.tag() << COUNT_BITS | 1, Ordering::SeqCst);
                    head.used.store(used as u32 + 1, Ordering::Relaxed);
                    head.live.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                // Long probes ahead: sweep the tombstones. Fewer than 5/8
                // of the entries are live, so this frees an eighth of the
                // table at least, and rebuilds cost O(1) per new address.
                self.rebuild(slot);
                self.ip_add(slot, key)
            }
        }
    }

    /// Copies the live entries of `slot`'s current table into its other
    /// table, and makes that one current. Readers that probed the old one
    /// meanwhile see the generation change and probe again.
    fn rebuild(&self, slot: usize) {
        let head = &self.shared().ip_heads[slot];
        let generation = head.generation.load(Ordering::Relaxed);
        let old = self.table(slot, (generation % 2) as usize);
        let new = self.table(slot, ((generation + 1) % 2) as usize);
        // Release: a reader of a stale generation that loads one of these
        // entries then sees the current generation (stored before them)
        // and probes again.
        for e in new {
            e.store(0, Ordering::Release);
        }
        let mut live = 0;
        for e in old {
            let entry = e.load(Ordering::Relaxed);
            if entry & COUNT_MASK == 0 {
                continue;
            }
            if let Probe::Empty(i) = probe(new, IpKey(entry)) {
                new[i].store(entry, Ordering::Release);
                live += 1;
            }
        }
        head.generation.store(generation + 1, Ordering::SeqCst);
        head.used.store(live, Ordering::Relaxed);
        head.live.store(live, Ordering::Relaxed);
    }

    /// Counts one connection of `key` fewer in `slot`'s table (only the
    /// worker in `slot` calls it, for a key it counted there).
    pub fn ip_sub(&self, slot: usize, key: IpKey) {
        if !key.is_counted() {
            return;
        }
        let table = self.current_table(slot);
        if let Probe::Found(i, entry) = probe(table, key) {
            if entry & COUNT_MASK == 0 {
                return;
            }
            // What is left at 0 is a tombstone, reused or swept later.
            table[i].store(entry - 1, Ordering::Release);
            if entry & COUNT_MASK == 1 {
                self.shared().ip_heads[slot]
                    .live
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Live connections of `key` across every live worker: exact, but for
    /// the 44-bit hash collisions of the module header.
    pub fn ip_total(&self, key: IpKey) -> u32 {
        if !key.is_counted() {
            return 0;
        }
        let shared = self.shared();
        let mut total = 0;
        for (word_index, word) in shared.live.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let slot = word_index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                total += self.ip_count(slot, key);
            }
        }
        total
    }

    /// `key`'s count in `slot`'s table, probed again whenever the table
    /// was rebuilt meanwhile (lock-free: each retry means its owner made
    /// progress).
    fn ip_count(&self, slot: usize, key: IpKey) -> u32 {
        let head = &self.shared().ip_heads[slot];
        loop {
            let generation = head.generation.load(Ordering::SeqCst);
            let table = self.table(slot, (generation % 2) as usize);
            let count = match probe(table, key) {
                Probe::Found(_, entry) => (entry & COUNT_MASK) as u32,
                _ => 0,
            };
            if head.generation.load(Ordering::SeqCst) == generation {
                return count;
            }
        }
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

/// Entries in a per-address table that counts `addresses` distinct
/// addresses at under 5/8 load: a power of two, one page at least.
fn ip_entries_for(addresses: usize) -> usize {
    (addresses.max(1) * 8)
        .div_ceil(5)
        .next_power_of_two()
        .max(MIN_IP_ENTRIES)
}

/// Where a linear probe for a key ended.
enum Probe {
    /// The key's entry, at this index, holding this (its count may be 0).
    Found(usize, u64),
    /// The key is not in the table; this is the first tombstone on its
    /// path, where it may be counted.
    Tombstone(usize),
    /// The key is not in the table, nor a tombstone on its path; this is
    /// the empty entry that ends the path.
    Empty(usize),
}

/// Probes `table` for `key` from its home entry: up to the first empty
/// entry, or around the whole table. Loads are SeqCst (see
/// [`Scoreboard::ip_add`]).
fn probe(table: &[AtomicU64], key: IpKey) -> Probe {
    let mask = table.len() - 1;
    let mut i = key.home(table.len());
    let mut tombstone = None;
    for _ in 0..table.len() {
        let entry = table[i].load(Ordering::SeqCst);
        if entry == 0 {
            return match tombstone {
                Some(t) => Probe::Tombstone(t),
                None => Probe::Empty(i),
            };
        }
        if entry >> COUNT_BITS == key.tag() {
            return Probe::Found(i, entry);
        }
        if entry & COUNT_MASK == 0 && tombstone.is_none() {
            tombstone = Some(i);
        }
        i = (i + 1) & mask;
    }
    // No empty entry at all: the owner keeps a quarter of the table empty,
    // so only a reader racing a rebuild gets here, and it probes again.
    match tombstone {
        Some(t) => Probe::Tombstone(t),
        None => Probe::Empty(key.home(table.len())),
    }
}

/// The system's page size.
fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as usize,
        _ => 4096,
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
    use std::net::Ipv4Addr;

    fn board() -> Scoreboard {
        Scoreboard::new(&Config::default()).unwrap()
    }

    /// The `i`th address of 127.0.0.0/8, past 127.0.0.0.
    fn addr(i: u32) -> IpAddr {
        Ipv4Addr::from(0x7f00_0001 + i).into()
    }

    #[test]
    fn slots_are_claimed_reset_and_released() {
        let mut b = board();
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
    fn tables_are_sized_for_the_config() {
        let sized = |max_connections, max_connections_per_ip| {
            addresses_to_count(&Config {
                max_connections,
                max_connections_per_ip,
                ..Config::default()
            })
        };
        assert_eq!(sized(50_000, 4), 50_000);
        assert_eq!(sized(50_000, 0), 1024, "no cap: the default's size");
        assert_eq!(sized(10, 0), 10);
        // Room for the addresses at under 5/8 load, a page at least.
        for n in [1, 10, 320, 321, 1000, 1024, 50_000, 1_000_000] {
            let entries = ip_entries_for(n);
            assert!(entries.is_power_of_two() && entries >= MIN_IP_ENTRIES);
            assert!(entries * 5 / 8 >= n, "{n}: {entries}");
            assert!(entries / 2 * 5 / 8 < n || entries == MIN_IP_ENTRIES);
        }
        let b = Scoreboard::counting(1024).unwrap();
        assert!(b.ip_addresses() >= 1024);
    }

    #[test]
    fn per_address_counts_sum_over_live_workers_only() {
        let mut b = board();
        let (w1, w2) = (b.claim().unwrap(), b.claim().unwrap());
        let a = b.ip_key("127.0.0.2".parse().unwrap());
        let other = b.ip_key("127.0.0.3".parse().unwrap());
        assert!(b.ip_add(w1, a));
        assert!(b.ip_add(w2, a));
        assert!(b.ip_add(w2, a));
        assert_eq!(b.ip_total(a), 3);
        b.ip_sub(w2, a);
        assert_eq!(b.ip_total(a), 2);
        assert_eq!(b.ip_total(other), 0, "an address never seen counts 0");
        // A worker that died holding connections stops counting.
        b.release(w1);
        assert_eq!(b.ip_total(a), 1);
        // And its table is clean for the next worker.
        let again = b.claim().unwrap();
        assert_eq!(again, w1);
        assert_eq!(b.ip_total(a), 1);
        assert!(b
            .table(w1, 0)
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == 0));
        assert!(b
            .table(w1, 1)
            .iter()
            .all(|e| e.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn counts_are_exact_with_a_thousand_addresses_per_worker() {
        // What a count-min sketch of 1024 buckets got wrong: with 1024
        // addresses held per worker, a new address looked held.
        let mut b = board();
        let (w1, w2) = (b.claim().unwrap(), b.claim().unwrap());
        let keys: Vec<IpKey> = (0..2048).map(|i| b.ip_key(addr(i))).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(b.ip_add(if i % 2 == 0 { w1 } else { w2 }, *k));
        }
        assert!(keys.iter().all(|k| b.ip_total(*k) == 1));
        let strangers = (5000..15_000).filter(|&i| b.ip_total(b.ip_key(addr(i))) != 0);
        assert_eq!(strangers.count(), 0);
    }

    #[test]
    fn tombstones_are_swept_and_counts_survive_rebuilds() {
        let mut b = Scoreboard::counting(10).unwrap();
        let (me, other) = (b.claim().unwrap(), b.claim().unwrap());
        let room = b.ip_addresses();
        let held: Vec<IpKey> = (0..room as u32 / 2).map(|i| b.ip_key(addr(i))).collect();
        for k in &held {
            assert!(b.ip_add(me, *k));
        }
        assert!(b.ip_add(other, held[0]));
        // Many more distinct addresses come and go: each leaves a
        // tombstone, swept by rebuilds.
        for i in 0..20_000 {
            let k = b.ip_key(addr(100_000 + i));
            assert!(b.ip_add(me, k), "connection {i}: no room");
            assert_eq!(b.ip_total(k), 1);
            b.ip_sub(me, k);
            assert_eq!(b.ip_total(k), 0);
        }
        let head = &b.shared().ip_heads[me];
        assert!(head.generation.load(Ordering::Relaxed) >= 20_000 / b.ip_entries as u64);
        assert!(head.used.load(Ordering::Relaxed) as usize <= b.ip_entries * 3 / 4);
        assert_eq!(head.live.load(Ordering::Relaxed) as usize, held.len());
        assert_eq!(b.ip_total(held[0]), 2);
        assert!(held[1..].iter().all(|k| b.ip_total(*k) == 1));
    }

    #[test]
    fn a_full_table_counts_no_new_address() {
        let mut b = Scoreboard::counting(10).unwrap();
        let me = b.claim().unwrap();
        let room = b.ip_addresses() as u32;
        for i in 0..room {
            assert!(b.ip_add(me, b.ip_key(addr(i))), "address {i} of {room}");
        }
        let new = b.ip_key(addr(room));
        assert!(!b.ip_add(me, new), "full");
        assert_eq!(b.ip_total(new), 0);
        // An address already counted is counted again.
        let first = b.ip_key(addr(0));
        assert!(b.ip_add(me, first));
        assert_eq!(b.ip_total(first), 2);
        // Once some addresses leave, a new one has room again.
        for i in 1..=room / 4 {
            b.ip_sub(me, b.ip_key(addr(i)));
        }
        assert!(b.ip_add(me, new));
        assert_eq!(b.ip_total(new), 1);
        assert_eq!(b.ip_total(first), 2);
    }

    #[test]
    fn the_uncounted_key_counts_nothing() {
        let mut b = board();
        let me = b.claim().unwrap();
        assert!(!b.ip_add(me, IpKey::default()));
        b.ip_sub(me, IpKey::default());
        assert_eq!(b.ip_total(IpKey::default()), 0);
        assert!(b.ip_key(addr(7)).is_counted());
    }

    #[test]
    fn a_reader_never_misses_a_held_address_while_its_owner_rebuilds() {
        /// Shares the board between two threads standing for two workers.
        struct Both<'a>(&'a Scoreboard);
        // SAFETY: the threads only call ip_add/ip_sub on the owner's slot
        // (one thread) and ip_total (the other), which touch the mapping
        // through atomics only, as two processes would.
        unsafe impl Sync for Both<'_> {}
        let mut b = Scoreboard::counting(10).unwrap();
        let owner = b.claim().unwrap();
        let held = b.ip_key(addr(1));
        assert!(b.ip_add(owner, held));
        let both = Both(&b);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let churn = scope.spawn(|| {
                let both = &both;
                for i in 0..200_000 {
                    let k = both.0.ip_key(addr(1000 + i));
                    assert!(both.0.ip_add(owner, k));
                    both.0.ip_sub(owner, k);
                }
                stop.store(true, Ordering::Relaxed);
            });
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(both.0.ip_total(held), 1, "after {reads} reads");
                reads += 1;
            }
            churn.join().unwrap();
        });
        let generation = b.shared().ip_heads[owner]
            .generation
            .load(Ordering::Relaxed);
        assert!(generation > 100, "only {generation} rebuilds");
    }

    #[test]
    fn neighbouring_addresses_have_different_keys() {
        let b = board();
        let mut tags: Vec<u64> = (0..10_000).map(|i| b.ip_key(addr(i)).tag()).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), 10_000);
    }

    #[test]
    fn others_are_the_fresh_live_workers_that_take_connections() {
        let mut b = board();
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
        let mut b = board();
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
        let b = board();
        let v4 = b.ip_key("10.1.2.3".parse().unwrap());
        let mapped = b.ip_key("::ffff:10.1.2.3".parse().unwrap());
        assert_eq!(v4, mapped);
    }
}
