//! Counting and summarising: the per-thread tallies, the latency histogram
//! and its percentiles, and rates over the measured interval.
//!
//! Runs in: every client thread (recording) and the main thread (merging and
//! summarising). Owns no descriptors and no signals; unit-tested below.

use std::time::Duration;

use hdrhistogram::Histogram;

/// What one client thread counted inside the measured interval (errors are
/// counted whenever they happen: warm-up errors are errors too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Completed, verified round trips (pingpong), connections (connrate),
    /// or proven connections (hold).
    pub messages: u64,
    /// Verified echoed bytes (one direction).
    pub bytes: u64,
    /// Echoed bytes that differ from those sent, or bytes never sent.
    pub mismatches: u64,
    /// Connections that failed with an I/O error (`ECONNRESET`, `EPIPE`...).
    pub resets: u64,
    /// Connections the server closed early: before echoing everything, or
    /// while they were meant to stay open.
    pub closed: u64,
    /// Connects or echoes that took longer than the timeout.
    pub timeouts: u64,
    /// Connects refused or failed.
    pub connect_errors: u64,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.mismatches += other.mismatches;
        self.resets += other.resets;
        self.closed += other.closed;
        self.timeouts += other.timeouts;
        self.connect_errors += other.connect_errors;
    }

    /// Every failure, of any kind.
    pub fn errors(&self) -> u64 {
        self.mismatches + self.resets + self.closed + self.timeouts + self.connect_errors
    }
}

/// The lowest and highest latencies the histogram keeps, in nanoseconds;
/// values outside are clamped (a round trip over 100 s is a timeout anyway).
const LOWEST_NS: u64 = 1;
const HIGHEST_NS: u64 = 100_000_000_000;

/// A latency distribution: an HDR histogram of nanoseconds with 3 significant
/// digits (every recorded value is kept within 0.1 %), mergeable across
/// threads.
pub struct Latency {
    hist: Histogram<u64>,
}

/// Percentiles of a distribution, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    pub fn new() -> Latency {
        // The bounds are constants that satisfy the constructor's conditions
        // (1 <= low, 2·low <= high, sigfig <= 5), so this cannot fail.
        let hist = Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, 3)
            .expect("constant histogram bounds are valid");
        Latency { hist }
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns.clamp(LOWEST_NS, HIGHEST_NS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Both histograms have the same bounds, so adding cannot fail; a
        // failure would only lose samples of a summary, never corrupt it.
        let _ = self.hist.add(&other.hist);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The summary, or `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Percentiles> {
        if self.hist.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Percentiles {
            p50: us(self.hist.value_at_quantile(0.50)),
            p90: us(self.hist.value_at_quantile(0.90)),
            p99: us(self.hist.value_at_quantile(0.99)),
            p999: us(self.hist.value_at_quantile(0.999)),
            max: us(self.hist.max()),
            mean: self.hist.mean() / 1000.0,
        })
    }
}

/// `count` per second over `interval`; 0 for an empty interval.
pub fn per_second(count: u64, interval: Duration) -> f64 {
    let s = interval.as_secs_f64();
    if s > 0.0 {
        count as f64 / s
    } else {
        0.0
    }
}

/// `total` divided by `count`, or `None` when `count` is 0.
pub fn ratio(total: f64, count: u64) -> Option<f64> {
    (count > 0).then(|| total / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= want * 0.001 + 0.001
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut lat = Latency::new();
        // 1 µs, 2 µs, ..., 100 000 µs: the q-quantile is q · 100 000 µs.
        for us in 1..=100_000u64 {
            lat.record(Duration::from_micros(us));
        }
        let p = lat.summary().unwrap();
        assert!(close(p.p50, 50_000.0), "{p:?}");
        assert!(close(p.p90, 90_000.0), "{p:?}");
        assert!(close(p.p99, 99_000.0), "{p:?}");
        assert!(close(p.p999, 99_900.0), "{p:?}");
        assert!(close(p.max, 100_000.0), "{p:?}");
        assert!(close(p.mean, 50_000.5), "{p:?}");
    }

    #[test]
    fn percentiles_of_a_skewed_distribution() {
        let mut lat = Latency::new();
        // 990 samples of 10 µs and 10 of 1 ms: p99 is still 10 µs, p99.9 1 ms.
        for _ in 0..990 {
            lat.record(Duration::from_micros(10));
        }
        for _ in 0..10 {
            lat.record(Duration::from_millis(1));
        }
        let p = lat.summary().unwrap();
        assert!(close(p.p50, 10.0), "{p:?}");
        assert!(close(p.p99, 10.0), "{p:?}");
        assert!(close(p.p999, 1000.0), "{p:?}");
        assert!(close(p.mean, 10.0 * 0.99 + 1000.0 * 0.01), "{p:?}");
    }

    #[test]
    fn merged_halves_equal_the_whole() {
        let (mut a, mut b, mut whole) = (Latency::new(), Latency::new(), Latency::new());
        for us in 1..=1000u64 {
            let d = Duration::from_micros(us * 3);
            whole.record(d);
            if us % 2 == 0 {
                a.record(d)
            } else {
                b.record(d)
            }
        }
        a.merge(&b);
        assert_eq!(a.count(), 1000);
        assert_eq!(a.summary(), whole.summary());
    }

    #[test]
    fn empty_and_extreme_values() {
        let mut lat = Latency::new();
        assert_eq!(lat.summary(), None);
        lat.record(Duration::ZERO);
        lat.record(Duration::from_secs(1000));
        assert_eq!(lat.count(), 2);
        assert!(lat.summary().unwrap().max <= HIGHEST_NS as f64 / 1000.0 * 1.001);
    }

    #[test]
    fn tally_adds_and_counts_errors() {
        let mut t = Tally {
            messages: 5,
            timeouts: 1,
            ..Tally::default()
        };
        t.add(&Tally {
            messages: 2,
            bytes: 10,
            mismatches: 1,
            resets: 1,
            closed: 1,
            connect_errors: 1,
            ..Tally::default()
        });
        assert_eq!(t.messages, 7);
        assert_eq!(t.bytes, 10);
        assert_eq!(t.errors(), 5);
    }

    #[test]
    fn rates() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(ratio(10.0, 4), Some(2.5));
        assert_eq!(ratio(10.0, 0), None);
    }
}
