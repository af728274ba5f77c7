//! A prefork worker's scheduling policy (`sched_policy`): whether the
//! kernel lets it preempt the running task when a client's data wakes it.
//!
//! Runs in: the prefork workers (both loops), after the fork, and the one
//! process of `--single-process`; the master and fork mode's connection
//! children keep the policy echod was started with.
//!
//! Under Linux's normal policy (`SCHED_OTHER`) a task that a wake-up makes
//! runnable preempts the task running on its CPU when the scheduler thinks
//! it has waited long enough. For one connection that is what the client
//! wants: its echo goes out at once. For a worker serving many busy
//! connections on CPUs shared with their clients it is waste: the worker
//! wakes for the first message, preempts the client that was about to send
//! the next forty-nine, and sleeps again after one or two, so both pay a
//! context switch every few messages. A `SCHED_BATCH` task does not preempt
//! on wake-up (its turn comes at the next tick, or as soon as a CPU is
//! free), so it finds more ready connections per wake-up and switches far
//! less; the kernel says what the policy is for: CPU-intensive,
//! non-interactive work (sched(7)). Measured side by side with the tokio
//! reference: see docs/BENCHMARKS.md, "Wake-up preemption".
//!
//! `sched_policy = "auto"` (the default) decides per worker from what its
//! wake-ups bring: [`Preemption::after_wait`] counts the ready connections
//! each wait returned, and every [`WINDOW_MS`] a worker whose waits brought
//! 2.5 or more on average ([`BATCH_AT_TENTHS`]) turns to `SCHED_BATCH`, and
//! one in batch whose waits brought fewer than 2 ([`OTHER_BELOW_TENTHS`])
//! turns back. Measured under `SCHED_OTHER` (windows of 100 ms, side by
//! side with the tokio reference on two CPUs): one or two ping-pong
//! connections bring 1.0-1.5 per wait, eight clients connecting and closing
//! as fast as they can 1.3-1.7, 50 ping-pong connections over two workers
//! 3.5 (io_uring) to 4.5 (epoll), with a tenth of the windows down at 1.5-1.9;
//! once in batch, the same 50 bring far more per wait, which keeps the
//! worker there. A worker with one or two active clients (a health
//! check, a latency probe) so stays preemptive; a worker whose every wake-up
//! finds a crowd gives up preemption it gains nothing from. `"other"` and
//! `"batch"` fix the policy for good.
//!
//! Only the normal class is touched: a worker that inherits a realtime or
//! idle policy (`CPUSchedulingPolicy=fifo` under systemd, `chrt`) keeps it,
//! whatever the key says. Switching between `SCHED_OTHER` and `SCHED_BATCH`
//! keeps the nice value and needs no privilege; if the kernel refuses it
//! anyway (a seccomp filter), the worker logs one line and keeps its policy.

use crate::config::{Config, SchedPolicy};

/// The period over which `auto` averages the ready connections per wait.
pub(crate) const WINDOW_MS: u64 = 100;
/// The average of ready connections per wait, in tenths, at which `auto`
/// turns a worker to `SCHED_BATCH`.
pub(crate) const BATCH_AT_TENTHS: u64 = 25;
/// The average, in tenths, below which `auto` turns a batch worker back.
pub(crate) const OTHER_BELOW_TENTHS: u64 = 20;

/// One worker's scheduling policy and, under `auto`, what decides it.
pub(crate) struct Preemption {
    /// Whether `after_wait` may still change the policy.
    auto: bool,
    /// Whether the worker runs as `SCHED_BATCH` now.
    batch: bool,
    /// `SCHED_RESET_ON_FORK` if the worker has it, else 0: or-ed into
    /// every switch, which would clear it otherwise (and, unprivileged, be
    /// refused for trying). Only `--single-process` can have it: the
    /// kernel clears it in a forked child.
    reset_on_fork: libc::c_int,
    /// Start of the current window, in the worker's `now_ms` clock.
    since: u64,
    /// Waits and ready connections counted in the current window.
    waits: u64,
    ready: u64,
}

impl Preemption {
    /// Sets the policy `config` asks for at start (`auto` starts as
    /// `SCHED_OTHER`), unless the worker inherited one outside the normal
    /// class.
    pub(crate) fn new(config: &Config, now: u64) -> Preemption {
        let mut p = Preemption {
            auto: false,
            batch: false,
            reset_on_fork: 0,
            since: now,
            waits: 0,
            ready: 0,
        };
        let policy = current();
        if let Some(policy) = policy {
            p.reset_on_fork = policy & libc::SCHED_RESET_ON_FORK;
        }
        match policy.map(|policy| policy & !libc::SCHED_RESET_ON_FORK) {
            Some(libc::SCHED_OTHER) => {}
            Some(libc::SCHED_BATCH) => p.batch = true,
            Some(other) => {
                log::info!(
                    "scheduling policy {} inherited; sched_policy = \"{}\" not applied",
                    name(other),
                    config.sched_policy.as_str()
                );
                return p;
            }
            None => return p,
        }
        // No call when the policy is already right: where a seccomp filter
        // denies the call, a worker that never needs it logs nothing.
        let batch = config.sched_policy == SchedPolicy::Batch;
        if batch == p.batch || p.switch(batch) {
            p.auto = config.sched_policy == SchedPolicy::Auto;
        }
        p
    }

    /// Records a wait (an `epoll_wait`, an `io_uring_enter`) that brought
    /// `events` events, of which `ready` were connections with bytes to
    /// move, at `now` (ms); `polled`: it was a busy poll (`busy_poll`),
    /// which returns at once instead of sleeping. At the end of a window,
    /// `auto` decides.
    ///
    /// Counted are the waits that brought a ready connection and those that
    /// slept and brought nothing (a timeout: a quiet worker); not those that
    /// brought only other events (an accept, a signal, the io_uring
    /// worker's send completions, which its next enter returns at once
    /// after a batch of receives and would halve every average), nor the
    /// busy polls that found nothing: a busy-polling worker makes hundreds
    /// of those between two crowds, which would keep every average below
    /// the turn.
    pub(crate) fn after_wait(&mut self, ready: usize, events: usize, polled: bool, now: u64) {
        if !self.auto {
            return;
        }
        if ready > 0 || (events == 0 && !polled) {
            self.waits += 1;
            self.ready += ready as u64;
        }
        if now.saturating_sub(self.since) < WINDOW_MS {
            return;
        }
        let batch = wants_batch(self.batch, self.waits, self.ready);
        self.since = now;
        self.waits = 0;
        self.ready = 0;
        if batch != self.batch && !self.switch(batch) {
            self.auto = false;
        }
    }

    /// Sets `SCHED_BATCH` (`batch`) or `SCHED_OTHER`; false (logged) if the
    /// kernel refused.
    fn switch(&mut self, batch: bool) -> bool {
        let policy = if batch {
            libc::SCHED_BATCH
        } else {
            libc::SCHED_OTHER
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is an initialised `sched_param` that outlives the
        // call, which only reads it; pid 0 is the calling thread (the
        // worker's only one).
        if unsafe { libc::sched_setscheduler(0, policy | self.reset_on_fork, &param) } != 0 {
            log::warn!(
                "cannot set scheduling policy {}: {}; keeping the current one",
                name(policy),
                std::io::Error::last_os_error()
            );
            return false;
        }
        if batch != self.batch {
            log::debug!("scheduling policy {}", name(policy));
        }
        self.batch = batch;
        true
    }
}

/// Whether a window of `waits` waits that brought `ready` ready connections
/// in all leaves the worker in batch (`batch`: whether it is now).
pub(crate) fn wants_batch(batch: bool, waits: u64, ready: u64) -> bool {
    if waits == 0 {
        return batch;
    }
    if batch {
        10 * ready >= OTHER_BELOW_TENTHS * waits
    } else {
        10 * ready >= BATCH_AT_TENTHS * waits
    }
}

/// A policy's name in sched(7).
fn name(policy: libc::c_int) -> String {
    match policy {
        libc::SCHED_OTHER => "SCHED_OTHER".to_owned(),
        libc::SCHED_FIFO => "SCHED_FIFO".to_owned(),
        libc::SCHED_RR => "SCHED_RR".to_owned(),
        libc::SCHED_BATCH => "SCHED_BATCH".to_owned(),
        libc::SCHED_IDLE => "SCHED_IDLE".to_owned(),
        // SCHED_DEADLINE and SCHED_EXT (Linux 6.12), which libc does not
        // name.
        6 => "SCHED_DEADLINE".to_owned(),
        7 => "SCHED_EXT".to_owned(),
        other => format!("number {other}"),
    }
}

/// The calling thread's policy, with `SCHED_RESET_ON_FORK` or-ed in when it
/// is set; `None` (logged) if the kernel will not say.
fn current() -> Option<libc::c_int> {
    // SAFETY: no pointer is passed; pid 0 is the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        log::warn!(
            "cannot read the scheduling policy: {}; sched_policy not applied",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_turns_to_batch_at_two_and_a_half_per_wait_and_back_below_two() {
        // From SCHED_OTHER: 2.5 ready per wait on average turns it.
        assert!(!wants_batch(false, 10, 24));
        assert!(wants_batch(false, 10, 25));
        assert!(wants_batch(false, 1, 50));
        // One connection: one per wait, never batch.
        assert!(!wants_batch(false, 1000, 1000));
        // Eight short connections at a time (measured 1.3-1.7): no.
        assert!(!wants_batch(false, 100, 170));
        // In batch: stays down to 2 per wait, leaves below.
        assert!(wants_batch(true, 10, 20));
        assert!(wants_batch(true, 10, 24));
        assert!(!wants_batch(true, 10, 19));
        // Idle waits (timeouts) count: a worker that went quiet leaves.
        assert!(!wants_batch(true, 1, 0));
        // No wait: nothing to go by, no change.
        assert!(wants_batch(true, 0, 0));
        assert!(!wants_batch(false, 0, 0));
    }

    #[test]
    fn a_window_decides_only_when_it_ends() {
        let mut p = Preemption {
            auto: true,
            batch: false,
            reset_on_fork: 0,
            since: 1000,
            waits: 0,
            ready: 0,
        };
        for t in 1000..1099 {
            p.after_wait(50, 60, false, t);
            // Waits that brought only other events are not counted, nor
            // busy polls that brought nothing.
            p.after_wait(0, 3, false, t);
            p.after_wait(0, 0, true, t);
            p.after_wait(0, 0, true, t);
        }
        assert!(!p.batch, "decided before the window ended");
        assert_eq!((p.waits, p.ready), (99, 99 * 50));
        p.after_wait(50, 50, false, 1100);
        assert_eq!((p.waits, p.ready, p.since), (0, 0, 1100));
        assert!(p.batch);
        assert_eq!(thread_policy(), libc::SCHED_BATCH);
        // A quiet window: back to the normal policy.
        p.after_wait(0, 0, false, 1250);
        assert!(!p.batch);
        assert_eq!(thread_policy(), libc::SCHED_OTHER);
        // A busy poll that brought a crowd counts as any other wait.
        p.after_wait(50, 50, true, 1260);
        assert_eq!((p.waits, p.ready), (1, 50));
    }

    /// The calling thread's policy as the kernel shows it (field 41 of
    /// `/proc/thread-self/stat`).
    fn thread_policy() -> libc::c_int {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        // Fields from 3 (state) on; the policy is field 41.
        after_comm.split(' ').nth(41 - 3).unwrap().parse().unwrap()
    }
}
