//! The master's table of children: who they are, which generation they
//! belong to, and what phase of life they are in; plus the pure decisions
//! the master takes on it (how many to spawn, whom to retire, how long to
//! back off). No descriptor, no syscall: unit-tested without processes.
//!
//! Runs in: the master.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// What a child does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A prefork worker, numbered within its generation; `slot` is its
    /// scoreboard cell. Every worker has one: the master spawns none while
    /// the scoreboard is full (it logs that and backs off instead).
    /// `timeout` is the `worker_timeout` of the config it was forked with
    /// (zero: no heartbeat supervision). The worker's heartbeat period
    /// derives from that config, frozen at fork, so after a reload an
    /// old-generation worker is judged by its own timeout, never by the new
    /// config's.
    Worker {
        id: usize,
        slot: usize,
        timeout: Duration,
    },
    /// A fork-mode child serving one connection.
    Conn { peer: SocketAddr },
}

/// Where a child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting (a worker) or serving (a connection child).
    Serving,
    /// A worker that asked to be recycled: still accepting, not counted in
    /// the pool, retired once its replacement is up.
    Recycling,
    /// Told to drain (`SIGTERM`); killed at `deadline` if still alive.
    Retiring { deadline: Instant },
    /// Sent `SIGKILL`, for this reason; waiting to be reaped.
    Killed(Kill),
}

/// Why the master killed a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// Still running at its drain deadline (`shutdown_timeout`).
    Deadline,
    /// No heartbeat for `worker_timeout`.
    Heartbeat,
    /// A fast stop (`SIGINT`, `SIGQUIT`, a second `SIGTERM`).
    FastStop,
}

impl Kill {
    /// The reason, as a log line says it (with a leading space).
    pub fn describe(self) -> &'static str {
        match self {
            Kill::Deadline => " at its drain deadline",
            Kill::Heartbeat => " for a missed heartbeat",
            Kill::FastStop => " by a fast stop",
        }
    }
}

/// One child of the master.
#[derive(Debug, Clone)]
pub struct Child {
    /// Its pid.
    pub pid: Pid,
    /// What it does.
    pub role: Role,
    /// The config generation it was forked with (its config is frozen at
    /// fork: copy-on-write memory, never updated).
    pub generation: u64,
    /// When it was forked.
    pub spawned: Instant,
    /// Its phase.
    pub phase: Phase,
}

impl std::fmt::Display for Child {
    /// `worker 2 (pid 4711, gen 3)` or `connection child (pid 4712, gen 3,
    /// from 127.0.0.1:5555)`: identity first, for every log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.role {
            Role::Worker { id, .. } => {
                write!(f, "worker {id} (pid {}, gen {})", self.pid, self.generation)
            }
            Role::Conn { peer } => write!(
                f,
                "connection child (pid {}, gen {}, from {peer})",
                self.pid, self.generation
            ),
        }
    }
}

impl Child {
    /// Whether this is a prefork worker.
    pub fn is_worker(&self) -> bool {
        matches!(self.role, Role::Worker { .. })
    }

    /// The scoreboard slot of a worker (`None`: a connection child, which
    /// has none).
    pub fn slot(&self) -> Option<usize> {
        match self.role {
            Role::Worker { slot, .. } => Some(slot),
            Role::Conn { .. } => None,
        }
    }

    /// The heartbeat timeout this child is judged by: its own config's
    /// `worker_timeout` (`None`: not supervised, as a connection child or a
    /// worker forked with `worker_timeout = 0`).
    pub fn heartbeat_timeout(&self) -> Option<Duration> {
        match self.role {
            Role::Worker { timeout, .. } if !timeout.is_zero() => Some(timeout),
            _ => None,
        }
    }
}

/// Every live child of the master, by pid.
///
/// Invariant: `conns` is the number of connection children in
/// `children` (kept, not counted, as fork mode's accept loop asks for it
/// at every connection).
#[derive(Debug, Default)]
pub struct WorkerTable {
    children: BTreeMap<Pid, Child>,
    conns: usize,
}

/// What the pool needs to reach the wanted size.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Worker ids to spawn in the current generation.
    pub spawn: Vec<usize>,
    /// Workers to retire (the highest ids first), when there are too many.
    pub retire: Vec<Pid>,
}

impl WorkerTable {
    /// Records a new child.
    pub fn insert(&mut self, child: Child) {
        if !child.is_worker() {
            self.conns += 1;
        }
        if let Some(old) = self.children.insert(child.pid, child) {
            if !old.is_worker() {
                self.conns -= 1;
            }
        }
    }

    /// Forgets a reaped child and returns it.
    pub fn remove(&mut self, pid: Pid) -> Option<Child> {
        let child = self.children.remove(&pid)?;
        if !child.is_worker() {
            self.conns -= 1;
        }
        Some(child)
    }

    /// The child with this pid.
    pub fn get_mut(&mut self, pid: Pid) -> Option<&mut Child> {
        self.children.get_mut(&pid)
    }

    /// Every child.
    pub fn iter(&self) -> impl Iterator<Item = &Child> {
        self.children.values()
    }

    /// How many children are alive.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether no child is alive.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Connection children alive (fork mode's cap counts them all, of every
    /// generation: each is a process).
    pub fn connection_children(&self) -> usize {
        debug_assert_eq!(self.conns, self.iter().filter(|c| !c.is_worker()).count());
        self.conns
    }

    /// Workers of `generation` that count in the pool (serving, not
    /// recycling or retiring).
    pub fn pool(&self, generation: u64) -> impl Iterator<Item = &Child> {
        self.iter().filter(move |c| {
            c.is_worker() && c.generation == generation && c.phase == Phase::Serving
        })
    }

    /// Whether a worker is being recycled now (one at a time).
    pub fn recycling(&self) -> bool {
        self.iter().any(|c| c.phase == Phase::Recycling)
    }

    /// Compares the pool of `generation` with `wanted` workers.
    pub fn plan(&self, generation: u64, wanted: usize) -> Plan {
        let mut ids: Vec<(usize, Pid)> = self
            .pool(generation)
            .filter_map(|c| match c.role {
                Role::Worker { id, .. } => Some((id, c.pid)),
                Role::Conn { .. } => None,
            })
            .collect();
        ids.sort_unstable();
        if ids.len() > wanted {
            return Plan {
                spawn: vec![],
                retire: ids[wanted..].iter().rev().map(|&(_, pid)| pid).collect(),
            };
        }
        // Ids in use by any live worker of this generation (a recycling one
        // keeps its id until it exits, so its replacement takes a new one).
        let used: Vec<usize> = self
            .iter()
            .filter(|c| c.generation == generation && !matches!(c.phase, Phase::Killed(_)))
            .filter_map(|c| match c.role {
                Role::Worker { id, .. } => Some(id),
                Role::Conn { .. } => None,
            })
            .collect();
        let spawn = (0..)
            .filter(|id| !used.contains(id))
            .take(wanted - ids.len())
            .collect();
        Plan {
            spawn,
            retire: vec![],
        }
    }

    /// Children of generations before `generation` that are not yet told
    /// to go: they are marked retiring with `deadline` and returned, to be
    /// sent `SIGTERM`.
    pub fn retire_older(&mut self, generation: u64, deadline: Instant) -> Vec<Pid> {
        let mut out = Vec::new();
        for c in self.children.values_mut() {
            if c.generation < generation && matches!(c.phase, Phase::Serving | Phase::Recycling) {
                c.phase = Phase::Retiring { deadline };
                out.push(c.pid);
            }
        }
        out
    }

    /// Marks `pid` retiring until `deadline`.
    pub fn retire(&mut self, pid: Pid, deadline: Instant) {
        if let Some(c) = self.children.get_mut(&pid) {
            if matches!(c.phase, Phase::Serving | Phase::Recycling) {
                c.phase = Phase::Retiring { deadline };
            }
        }
    }

    /// Retiring children past their deadline, marked killed and returned
    /// (to be sent `SIGKILL`).
    pub fn overdue(&mut self, now: Instant) -> Vec<Pid> {
        let mut out = Vec::new();
        for c in self.children.values_mut() {
            if let Phase::Retiring { deadline } = c.phase {
                if now >= deadline {
                    c.phase = Phase::Killed(Kill::Deadline);
                    out.push(c.pid);
                }
            }
        }
        out
    }

    /// Marks every child killed and returns those not already killed (to
    /// be sent `SIGKILL`: a fast stop).
    pub fn kill_all(&mut self) -> Vec<Pid> {
        let mut out = Vec::new();
        for c in self.children.values_mut() {
            if !matches!(c.phase, Phase::Killed(_)) {
                c.phase = Phase::Killed(Kill::FastStop);
                out.push(c.pid);
            }
        }
        out
    }

    /// The earliest retirement deadline, for the master's poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.iter()
            .filter_map(|c| match c.phase {
                Phase::Retiring { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }
}

/// Crash-loop guard: how long to wait before the next respawn.
///
/// A worker that dies within [`Backoff::STABLE`] of its start counts as a
/// failure; each consecutive failure doubles the delay, from
/// [`Backoff::FIRST`] up to [`Backoff::MAX`]. A worker that lived longer
/// resets the count: one crash after hours of service is respawned at once.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    /// A worker that lives this long is considered healthy.
    pub const STABLE: Duration = Duration::from_secs(1);
    /// The first delay.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The cap.
    pub const MAX: Duration = Duration::from_secs(10);

    /// Records an unexpected worker exit after it `lived`; returns the delay
    /// imposed on the next spawn, if any.
    pub fn record_failure(&mut self, lived: Duration, now: Instant) -> Option<Duration> {
        if lived >= Self::STABLE {
            self.failures = 0;
            self.not_before = None;
            return None;
        }
        self.failures = self.failures.saturating_add(1);
        let delay = Self::delay(self.failures);
        self.not_before = Some(now + delay);
        Some(delay)
    }

    /// The delay after `failures` consecutive quick deaths.
    pub fn delay(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (Self::FIRST * 2u32.pow(doublings)).min(Self::MAX)
    }

    /// When spawning is allowed again (`None`: now).
    pub fn not_before(&self) -> Option<Instant> {
        self.not_before
    }

    /// Whether a spawn may happen at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// Forgets past failures (a reload brings a new config that may work).
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pid: i32, id: usize, generation: u64) -> Child {
        Child {
            pid: Pid::from_raw(pid),
            role: Role::Worker {
                id,
                slot: id,
                timeout: Duration::from_secs(30),
            },
            generation,
            spawned: Instant::now(),
            phase: Phase::Serving,
        }
    }

    #[test]
    fn an_empty_pool_spawns_every_id() {
        let t = WorkerTable::default();
        assert_eq!(
            t.plan(1, 3),
            Plan {
                spawn: vec![0, 1, 2],
                retire: vec![]
            }
        );
    }

    #[test]
    fn a_dead_worker_is_replaced_under_its_id() {
        let mut t = WorkerTable::default();
        t.insert(worker(10, 0, 1));
        t.insert(worker(12, 2, 1));
        assert_eq!(t.plan(1, 3).spawn, vec![1]);
    }

    #[test]
    fn too_many_workers_retire_highest_ids_first() {
        let mut t = WorkerTable::default();
        for (pid, id) in [(10, 0), (11, 1), (12, 2)] {
            t.insert(worker(pid, id, 1));
        }
        assert_eq!(
            t.plan(1, 1),
            Plan {
                spawn: vec![],
                retire: vec![Pid::from_raw(12), Pid::from_raw(11)]
            }
        );
    }

    #[test]
    fn a_recycling_worker_is_replaced_before_it_goes() {
        let mut t = WorkerTable::default();
        t.insert(worker(10, 0, 1));
        t.insert(worker(11, 1, 1));
        t.get_mut(Pid::from_raw(10)).unwrap().phase = Phase::Recycling;
        assert!(t.recycling());
        // The replacement takes a fresh id; the pool of two is restored
        // while the old one still accepts.
        assert_eq!(t.plan(1, 2).spawn, vec![2]);
    }

    #[test]
    fn a_reload_retires_every_older_child_once() {
        let mut t = WorkerTable::default();
        t.insert(worker(10, 0, 1));
        t.insert(worker(20, 0, 2));
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(t.retire_older(2, deadline), vec![Pid::from_raw(10)]);
        assert!(t.retire_older(2, deadline).is_empty());
        assert_eq!(t.next_deadline(), Some(deadline));
        assert!(t.overdue(deadline - Duration::from_millis(1)).is_empty());
        assert_eq!(t.overdue(deadline), vec![Pid::from_raw(10)]);
        assert!(t.overdue(deadline).is_empty(), "killed once");
        assert_eq!(t.pool(2).count(), 1);
    }

    #[test]
    fn quick_deaths_back_off_exponentially_up_to_the_cap() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let quick = Duration::from_millis(10);
        let delays: Vec<Duration> = (0..10)
            .map(|_| b.record_failure(quick, now).unwrap())
            .collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[2], Duration::from_millis(400));
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), Backoff::MAX);
        assert!(!b.allows(now));
        assert!(b.allows(now + Backoff::MAX));
        assert_eq!(b.record_failure(Duration::from_secs(5), now), None);
        assert!(b.allows(now));
    }

    #[test]
    fn each_worker_keeps_the_heartbeat_timeout_it_was_forked_with() {
        let mut w = worker(10, 0, 1);
        assert_eq!(w.heartbeat_timeout(), Some(Duration::from_secs(30)));
        w.role = Role::Worker {
            id: 0,
            slot: 0,
            timeout: Duration::ZERO,
        };
        assert_eq!(w.heartbeat_timeout(), None, "worker_timeout = 0");
        let conn = Child {
            role: Role::Conn {
                peer: "127.0.0.1:5555".parse().unwrap(),
            },
            ..worker(11, 0, 1)
        };
        assert_eq!(conn.heartbeat_timeout(), None);
    }

    #[test]
    fn connection_children_are_counted_as_they_come_and_go() {
        let conn = |pid| Child {
            role: Role::Conn {
                peer: "127.0.0.1:5555".parse().unwrap(),
            },
            ..worker(pid, 0, 1)
        };
        let mut t = WorkerTable::default();
        t.insert(worker(1, 0, 1));
        t.insert(conn(2));
        t.insert(conn(3));
        assert_eq!(t.connection_children(), 2);
        t.insert(conn(3));
        assert_eq!(t.connection_children(), 2, "the same pid again");
        assert!(t.remove(Pid::from_raw(2)).is_some());
        assert!(t.remove(Pid::from_raw(1)).is_some());
        assert!(t.remove(Pid::from_raw(9)).is_none());
        assert_eq!(t.connection_children(), 1);
    }

    #[test]
    fn children_describe_themselves_for_logs() {
        let w = worker(4711, 2, 3);
        assert_eq!(w.to_string(), "worker 2 (pid 4711, gen 3)");
    }
}
