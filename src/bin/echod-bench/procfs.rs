//! The server's cost, read from /proc: CPU time and memory of a process and
//! all its descendants (`--server-pid`).
//!
//! Runs in: the main thread of `echod-bench`, at the edges of the measured
//! interval. Opens /proc files briefly; owns no descriptors between calls and
//! no signals. The parsers are pure and unit-tested below.
//!
//! The tree is found by reading every `/proc/<pid>/stat` and following ppid
//! links down from the root: this needs no `CONFIG_PROC_CHILDREN`, and a
//! prefork or fork-per-connection server is a tree of processes.
//!
//! CPU time is `utime + stime + cutime + cstime` summed over the tree, in
//! clock ticks (`_SC_CLK_TCK`, 10 ms here). `utime`/`stime` of a process
//! include all its threads, live and exited. `cutime`/`cstime` hold the
//! whole CPU time of the children it has reaped (`wait`), so a process that
//! exits during the interval and is reaped by a member of the tree keeps its
//! time: it moves from the live sum to the reaper's `cutime`. Lost are only
//! processes reaped outside the tree (reparented to init or a subreaper
//! after their parent died) and auto-reaped ones (`SIGCHLD` ignored): their
//! CPU time is lost, and the figure reads low. A zombie not yet reaped at
//! the end sample still shows its times, so it is counted.
//!
//! Context switches are the voluntary and involuntary switches of every
//! thread of every process in the tree (`/proc/<pid>/task/<tid>/status`):
//! a switch is the sleep and wake-up that dominate a server's CPU per
//! message at low load. Unlike CPU time, /proc keeps no count for reaped
//! children, so a thread or process that exits during the interval takes
//! its count with it (fork mode's per-connection children are not counted).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("read /proc/{pid}/{file}: {source}")]
    Read {
        pid: i32,
        file: &'static str,
        source: io::Error,
    },
    #[error("parse /proc/{pid}/stat: {what}")]
    Parse { pid: i32, what: &'static str },
    #[error("list /proc: {0}")]
    List(io::Error),
}

/// The fields of `/proc/<pid>/stat` that the benchmark uses (proc(5)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub ppid: i32,
    /// User and system CPU of all threads, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// User and system CPU of reaped children (and their reaped children).
    pub cutime: u64,
    pub cstime: u64,
}

impl Stat {
    /// Own plus reaped children's CPU time, in ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses one `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so the fields
/// are counted from the last `)`.
pub fn parse_stat(text: &str) -> Result<Stat, &'static str> {
    let open = text.find('(').ok_or("no '('")?;
    let close = text.rfind(')').ok_or("no ')'")?;
    let pid = text[..open].trim().parse().map_err(|_| "bad pid")?;
    // After ')': field 3 (state) is index 0, so field N is index N - 3.
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<&str, &'static str> {
        rest.get(n - 3).copied().ok_or("too few fields")
    };
    let num =
        |n: usize| -> Result<u64, &'static str> { field(n)?.parse().map_err(|_| "bad number") };
    Ok(Stat {
        pid,
        ppid: field(4)?.parse().map_err(|_| "bad ppid")?,
        utime: num(14)?,
        stime: num(15)?,
        // cutime and cstime are signed in the kernel's format (clock_t).
        cutime: field(16)?.parse::<i64>().map_err(|_| "bad cutime")?.max(0) as u64,
        cstime: field(17)?.parse::<i64>().map_err(|_| "bad cstime")?.max(0) as u64,
    })
}

/// Context switches of each live thread of a tree, by thread id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Switches(HashMap<i32, u64>);

impl Switches {
    /// Switches made between `earlier` and this sample: each thread's
    /// growth, all of a thread born in between; a thread gone by now
    /// counts nothing (see the module notes).
    pub fn since(&self, earlier: &Switches) -> u64 {
        self.0
            .iter()
            .map(|(tid, &n)| n.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

/// `root` and every descendant of it, given `(pid, ppid)` pairs; `root`
/// first, parents before children.
pub fn descendants(root: i32, links: &[(i32, i32)]) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for &(pid, ppid) in links {
        if pid != ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut tree = vec![root];
    let mut seen = HashSet::from([root]);
    let mut next = 0;
    while let Some(&pid) = tree.get(next) {
        for &kid in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            // The set makes the walk finite even if a torn read of /proc
            // produced a cycle.
            if seen.insert(kid) {
                tree.push(kid);
            }
        }
        next += 1;
    }
    tree
}

/// Resident and proportional set sizes from `/proc/<pid>/smaps_rollup`, in
/// KiB: `(Rss, Pss)`.
pub fn parse_smaps_rollup(text: &str) -> (Option<u64>, Option<u64>) {
    let mut rss = None;
    let mut pss = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("Rss:") => &mut rss,
            Some("Pss:") => &mut pss,
            _ => continue,
        };
        *slot = words.next().and_then(|v| v.parse().ok());
    }
    (rss, pss)
}

/// A sample of the server tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSample {
    /// Processes in the tree, the root included.
    pub processes: usize,
    /// CPU time of the tree in clock ticks (see the module notes).
    pub cpu_ticks: u64,
    /// Summed RSS in KiB (shared pages counted once per process).
    pub rss_kib: u64,
    /// Summed PSS in KiB (shared pages split among their sharers); `None`
    /// when some process's smaps_rollup could not be read.
    pub pss_kib: Option<u64>,
}

fn read_stat(pid: i32) -> Result<Stat, ProcError> {
    let text =
        fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|source| ProcError::Read {
            pid,
            file: "stat",
            source,
        })?;
    parse_stat(&text).map_err(|what| ProcError::Parse { pid, what })
}

/// Every process's stat; processes that vanish while listing are skipped.
fn all_stats() -> Result<Vec<Stat>, ProcError> {
    let mut stats = Vec::new();
    for entry in fs::read_dir("/proc").map_err(ProcError::List)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Ok(stat) = read_stat(pid) {
            stats.push(stat);
        }
    }
    Ok(stats)
}

/// The stat of `root` and of each of its descendants that could be read.
/// Fails when `root` itself is gone.
fn tree_stats(root: i32) -> Result<Vec<Stat>, ProcError> {
    read_stat(root)?;
    let stats = all_stats()?;
    let links: Vec<(i32, i32)> = stats.iter().map(|s| (s.pid, s.ppid)).collect();
    let by_pid: HashMap<i32, &Stat> = stats.iter().map(|s| (s.pid, s)).collect();
    Ok(descendants(root, &links)
        .into_iter()
        .filter_map(|pid| by_pid.get(&pid).map(|s| **s))
        .collect())
}

/// The context switches of every thread of the processes `tree`.
fn switches_of(tree: &[Stat]) -> Switches {
    let mut all = HashMap::new();
    for stat in tree {
        let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", stat.pid)) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(n) = fs::read_to_string(task.path().join("status"))
                .ok()
                .and_then(|text| parse_switches(&text))
            {
                all.insert(tid, n);
            }
        }
    }
    Switches(all)
}

/// Samples the tree under `root`: its CPU time and, with `memory`, its
/// RSS and PSS. Fails when `root` itself is gone.
pub fn sample_tree(root: i32, memory: bool) -> Result<TreeSample, ProcError> {
    Ok(sample_of(&tree_stats(root)?, memory))
}

/// Samples the tree under `root` at an edge of a timed interval: its CPU
/// time and its threads' context switches, from one listing of /proc.
pub fn sample_timed(root: i32) -> Result<(TreeSample, Switches), ProcError> {
    let tree = tree_stats(root)?;
    Ok((sample_of(&tree, false), switches_of(&tree)))
}

/// The CPU time and, with `memory`, the RSS and PSS of the processes `tree`.
fn sample_of(tree: &[Stat], memory: bool) -> TreeSample {
    let mut sample = TreeSample {
        processes: 0,
        pss_kib: memory.then_some(0),
        ..TreeSample::default()
    };
    for stat in tree {
        let pid = stat.pid;
        sample.processes += 1;
        sample.cpu_ticks += stat.cpu_ticks();
        if memory {
            let (rss, pss) = match fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
                Ok(text) => parse_smaps_rollup(&text),
                Err(_) => (None, None),
            };
            // A zombie or kernel thread has no mappings: both read as absent.
            sample.rss_kib += rss.unwrap_or(0);
            sample.pss_kib = match (sample.pss_kib, pss, rss) {
                (Some(sum), Some(p), _) => Some(sum + p),
                (Some(sum), None, None) => Some(sum),
                _ => None,
            };
        }
    }
    sample
}

/// Voluntary plus involuntary context switches in one `status` file;
/// `None` without either line.
pub fn parse_switches(text: &str) -> Option<u64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(value) = line
            .strip_prefix("voluntary_ctxt_switches:")
            .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
        else {
            continue;
        };
        sum = Some(sum.unwrap_or(0) + value.trim().parse::<u64>().ok()?);
    }
    sum
}

/// Clock ticks per second, the unit of the CPU fields of stat.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the C library; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4711 (echod: worker 0) S 4700 4700 4700 0 -1 4194624 \
        150 0 0 0 123 45 6 7 20 0 1 0 12345 10000000 300 18446744073709551615 \
        1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(
            s,
            Stat {
                pid: 4711,
                ppid: 4700,
                utime: 123,
                stime: 45,
                cutime: 6,
                cstime: 7
            }
        );
        assert_eq!(s.cpu_ticks(), 181);
        let odd = STAT.replace("(echod: worker 0)", "(a) b (c))");
        assert_eq!(parse_stat(&odd).unwrap(), s);
    }

    #[test]
    fn malformed_stat_is_an_error() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("12 (x) S 1 2 3").is_err());
        assert!(parse_stat("x (y) S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0").is_err());
    }

    #[test]
    fn descendants_follow_ppid_links() {
        // 1 ─ 10 ─ 11 ─ 13
        //       └─ 12
        // 1 ─ 20 (not under 10)
        let links = [(1, 0), (10, 1), (11, 10), (12, 10), (13, 11), (20, 1)];
        let mut tree = descendants(10, &links);
        assert_eq!(tree[0], 10);
        tree.sort();
        assert_eq!(tree, vec![10, 11, 12, 13]);
        assert_eq!(descendants(13, &links), vec![13]);
        assert_eq!(descendants(99, &links), vec![99]);
    }

    #[test]
    fn smaps_rollup_gives_rss_and_pss() {
        let text = "55d0c0a00000-7ffd1d7f6000 ---p 00000000 00:00 0 [rollup]\n\
            Rss:                2048 kB\nPss:                1100 kB\n\
            Pss_Anon:            900 kB\nShared_Clean:        100 kB\n";
        assert_eq!(parse_smaps_rollup(text), (Some(2048), Some(1100)));
        assert_eq!(parse_smaps_rollup(""), (None, None));
    }

    #[test]
    fn switches_since_count_each_threads_growth() {
        let before = Switches(HashMap::from([(1, 10), (2, 5), (3, 7)]));
        // 1 grew by 4, 2 is gone, 3 is a new thread with a reused id
        // (counts nothing rather than going negative), 4 was born.
        let after = Switches(HashMap::from([(1, 14), (3, 2), (4, 6)]));
        assert_eq!(after.since(&before), 4 + 6);
        assert_eq!(before.since(&before), 0);
    }

    #[test]
    fn status_gives_both_kinds_of_switches() {
        let text = "Name:\techod\nState:\tS (sleeping)\n\
            voluntary_ctxt_switches:\t1200\nnonvoluntary_ctxt_switches:\t34\n";
        assert_eq!(parse_switches(text), Some(1234));
        assert_eq!(parse_switches("Name:\tx\n"), None);
        assert_eq!(parse_switches("voluntary_ctxt_switches:\tmany\n"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = std::process::id() as i32;
        let s = sample_tree(me, true).unwrap();
        assert!(s.processes >= 1);
        assert!(s.rss_kib > 0);
        let (_, before) = sample_timed(me).unwrap();
        // This thread sleeps, so it switches at least once.
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(sample_timed(me).unwrap().1.since(&before) > 0);
        assert!(clock_ticks_per_second() > 0);
    }
}
