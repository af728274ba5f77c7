//! The bytes each benchmark connection sends, and the exact check of what
//! comes back.
//!
//! Runs in: every client thread of `echod-bench`. Owns no descriptors and no
//! signals; pure computation, unit-tested below.
//!
//! Every connection has its own 64-bit key. Its stream is a sequence of
//! little-endian 64-bit words: word `b` is `TABLE[b mod 8192] ^
//! period_key(b / 8192)`, where `TABLE` is one fixed 64 KiB block of
//! splitmix64 output shared by all connections and `period_key(p)` is
//! `splitmix64(key + p · φ)`: a different mask for every connection and
//! every 64 KiB period. Any offset is computable without state, so a partial
//! write regenerates its unsent tail from the offset alone, and the reader
//! checks every echoed byte at its exact offset:
//! - a flipped byte differs from the table;
//! - a lost or duplicated byte shifts everything after it against the
//!   random table;
//! - bytes of another connection differ in every word by the XOR of the two
//!   connections' masks (distinct keys, since `mix` is a bijection), and a
//!   stale echo of an earlier period by the XOR of the two periods' masks.
//!
//! Inside a period the stream is a table XOR a constant, which compiles to
//! vector loads and XORs on plain x86-64: generating and checking run at
//! several GB/s per core, so stream mode measures the server, not the
//! client's checking (one splitmix64 round per 8 bytes ran at 2.5 GB/s for
//! fill plus check here, a third of a core at stream rates).

use std::sync::OnceLock;

/// The golden-ratio increment of splitmix64.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Words in the shared table: 64 KiB, small enough to stay in L2.
const TABLE_WORDS: usize = 8192;

/// The splitmix64 output function (Steele, Lea, Flood 2014): a bijection on
/// u64 with full avalanche, so neighbouring inputs look unrelated.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shared random table, computed once per process.
fn table() -> &'static [u64] {
    static TABLE: OnceLock<Vec<u64>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..TABLE_WORDS as u64)
            .map(|i| mix(0x6563_686f_6400_0000_u64.wrapping_add(i.wrapping_mul(GOLDEN))))
            .collect()
    })
}

/// Reads the little-endian word at the start of `bytes` (at least 8 long).
#[inline]
fn le_word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

/// The pseudo-random byte stream of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// Derived from the run seed and the connection number; two connections
    /// of one run never share a key (`mix` is a bijection).
    key: u64,
}

/// A run of whole words inside one period: `words` words from byte
/// `start` of the buffer, equal to `table[first..first + words] ^ mask`.
struct Run {
    start: usize,
    words: usize,
    first: usize,
    mask: u64,
}

/// One step over a buffer at a stream offset: a partial word (unaligned
/// head, short tail) or a run of whole words.
enum Step {
    Partial {
        start: usize,
        len: usize,
        word: [u8; 8],
        skip: usize,
    },
    Whole(Run),
}

impl Pattern {
    /// The stream of connection number `conn` in the run seeded with `seed`.
    pub fn new(seed: u64, conn: u64) -> Pattern {
        Pattern {
            key: mix(seed ^ mix(conn.wrapping_add(GOLDEN))),
        }
    }

    /// The mask of 64 KiB period `period`.
    #[inline]
    fn mask(&self, period: u64) -> u64 {
        mix(self.key.wrapping_add(period.wrapping_mul(GOLDEN)))
    }

    /// Word `index` of the stream.
    #[inline]
    fn word(&self, index: u64) -> u64 {
        table()[(index % TABLE_WORDS as u64) as usize] ^ self.mask(index / TABLE_WORDS as u64)
    }

    /// Cuts the stream bytes `offset .. offset + len` into steps, calling
    /// `f` on each in order; stops early when `f` returns false.
    fn steps(&self, offset: u64, len: usize, mut f: impl FnMut(Step) -> bool) {
        let mut pos = 0;
        while pos < len {
            let at = offset + pos as u64;
            let (index, skip) = (at / 8, (at % 8) as usize);
            let step = if skip != 0 || len - pos < 8 {
                let take = (8 - skip).min(len - pos);
                let word = self.word(index).to_le_bytes();
                pos += take;
                Step::Partial {
                    start: pos - take,
                    len: take,
                    word,
                    skip,
                }
            } else {
                let first = (index % TABLE_WORDS as u64) as usize;
                let words = ((len - pos) / 8).min(TABLE_WORDS - first);
                let run = Run {
                    start: pos,
                    words,
                    first,
                    mask: self.mask(index / TABLE_WORDS as u64),
                };
                pos += words * 8;
                Step::Whole(run)
            };
            if !f(step) {
                return;
            }
        }
    }

    /// Writes the stream's bytes `offset .. offset + out.len()` into `out`.
    pub fn fill(&self, offset: u64, out: &mut [u8]) {
        let t = table();
        self.steps(offset, out.len(), |step| {
            match step {
                Step::Partial {
                    start,
                    len,
                    word,
                    skip,
                } => out[start..start + len].copy_from_slice(&word[skip..skip + len]),
                Step::Whole(r) => {
                    let dst = &mut out[r.start..r.start + r.words * 8];
                    for (d, w) in dst.chunks_exact_mut(8).zip(&t[r.first..r.first + r.words]) {
                        d.copy_from_slice(&(w ^ r.mask).to_le_bytes());
                    }
                }
            }
            true
        });
    }

    /// The index in `data` of the first byte that differs from the stream's
    /// bytes at `offset ..`, or `None` when all of `data` matches.
    pub fn first_mismatch(&self, offset: u64, data: &[u8]) -> Option<usize> {
        let t = table();
        let mut found = None;
        self.steps(offset, data.len(), |step| {
            let (start, expected): (usize, Vec<u8>) = match step {
                Step::Partial {
                    start,
                    len,
                    word,
                    skip,
                } => {
                    if data[start..start + len] == word[skip..skip + len] {
                        return true;
                    }
                    (start, word[skip..skip + len].to_vec())
                }
                Step::Whole(r) => {
                    let got = &data[r.start..r.start + r.words * 8];
                    let want = &t[r.first..r.first + r.words];
                    // An OR of differences has no early exit, so it
                    // vectorizes; the rare mismatch is located below.
                    let diff = got
                        .chunks_exact(8)
                        .zip(want)
                        .fold(0, |acc, (g, w)| acc | (le_word(g) ^ w ^ r.mask));
                    if diff == 0 {
                        return true;
                    }
                    let bytes = want.iter().flat_map(|w| (w ^ r.mask).to_le_bytes());
                    (r.start, bytes.collect())
                }
            };
            let got = &data[start..start + expected.len()];
            found = got
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .map(|i| start + i);
            false
        });
        found
    }
}

/// What went wrong with an echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The echoed byte at stream offset `offset` is not the byte sent there.
    Mismatch { offset: u64 },
    /// The server sent bytes beyond those sent to it, from `offset` on.
    Excess { offset: u64 },
    /// The connection ended with `missing` sent bytes never echoed.
    Short { missing: u64 },
}

/// The accounting of one connection: what was sent, what came back, and
/// whether it was the same.
#[derive(Clone, Debug)]
pub struct EchoCheck {
    pattern: Pattern,
    /// Bytes written to the socket so far. Invariant: `received <= sent`.
    sent: u64,
    /// Bytes read back and verified so far.
    received: u64,
}

impl EchoCheck {
    pub fn new(pattern: Pattern) -> EchoCheck {
        EchoCheck {
            pattern,
            sent: 0,
            received: 0,
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Sent bytes whose echo has not arrived yet.
    pub fn outstanding(&self) -> u64 {
        self.sent - self.received
    }

    /// Fills `out` with the next bytes to send (from offset `sent`); call
    /// `record_sent` with the count the socket took.
    pub fn fill_next(&self, out: &mut [u8]) {
        self.pattern.fill(self.sent, out);
    }

    pub fn record_sent(&mut self, n: usize) {
        self.sent += n as u64;
    }

    /// Verifies `data`, just read from the socket, against the bytes sent at
    /// the same offsets, and counts it as received when it matches.
    pub fn record_received(&mut self, data: &[u8]) -> Result<(), Violation> {
        let room = self.outstanding();
        let (echo, excess) = if data.len() as u64 > room {
            data.split_at(room as usize)
        } else {
            (data, &[][..])
        };
        if let Some(at) = self.pattern.first_mismatch(self.received, echo) {
            return Err(Violation::Mismatch {
                offset: self.received + at as u64,
            });
        }
        self.received += echo.len() as u64;
        if !excess.is_empty() {
            return Err(Violation::Excess {
                offset: self.received,
            });
        }
        Ok(())
    }

    /// Checks the end of the stream (EOF from the server): every sent byte
    /// must have come back.
    pub fn finish(&self) -> Result<(), Violation> {
        match self.outstanding() {
            0 => Ok(()),
            missing => Err(Violation::Short { missing }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(p: &Pattern, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        p.fill(offset, &mut v);
        v
    }

    fn send(check: &mut EchoCheck, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        check.fill_next(&mut v);
        check.record_sent(len);
        v
    }

    #[test]
    fn fill_is_the_same_at_any_offset_and_split() {
        let p = Pattern::new(7, 3);
        let whole = bytes(&p, 0, 1000);
        for start in [0usize, 1, 5, 7, 8, 9, 63, 500] {
            for len in [0usize, 1, 3, 8, 13, 200] {
                let end = (start + len).min(whole.len());
                assert_eq!(
                    bytes(&p, start as u64, end - start),
                    &whole[start..end],
                    "start {start} len {len}"
                );
            }
        }
    }

    #[test]
    fn periods_join_seamlessly_and_differ() {
        let p = Pattern::new(3, 5);
        let period = TABLE_WORDS * 8;
        let whole = bytes(&p, 0, 3 * period + 100);
        for start in [period - 13, period - 8, period, 2 * period - 1, 3 * period] {
            assert_eq!(bytes(&p, start as u64, 100), &whole[start..start + 100]);
        }
        // A stale echo of the previous period does not pass.
        assert_ne!(whole[..64], whole[period..period + 64]);
        let mut check = EchoCheck::new(p);
        let mut sink = vec![0u8; period + 64];
        check.fill_next(&mut sink);
        check.record_sent(sink.len());
        check.record_received(&whole[..period]).unwrap();
        assert_eq!(
            check.record_received(&whole[..64]),
            Err(Violation::Mismatch {
                offset: period as u64
            })
        );
    }

    #[test]
    fn mismatch_in_an_unaligned_head_or_tail() {
        let p = Pattern::new(8, 8);
        let mut data = bytes(&p, 5, 20);
        assert_eq!(p.first_mismatch(5, &data), None);
        data[1] ^= 0x80;
        assert_eq!(p.first_mismatch(5, &data), Some(1));
        data[1] ^= 0x80;
        data[19] ^= 0x80;
        assert_eq!(p.first_mismatch(5, &data), Some(19));
    }

    #[test]
    fn streams_of_different_connections_differ() {
        let a = bytes(&Pattern::new(1, 0), 0, 64);
        let b = bytes(&Pattern::new(1, 1), 0, 64);
        let c = bytes(&Pattern::new(2, 0), 0, 64);
        assert_ne!(a, b);
        assert_ne!(a, c);
        // Not a constant or a short cycle.
        assert_ne!(a[..8], a[8..16]);
    }

    #[test]
    fn faithful_echo_in_pieces_passes() {
        let mut check = EchoCheck::new(Pattern::new(9, 9));
        let sent = send(&mut check, 5000);
        for piece in sent.chunks(777) {
            check.record_received(piece).unwrap();
        }
        assert_eq!(check.received(), 5000);
        assert_eq!(check.finish(), Ok(()));
    }

    #[test]
    fn flipped_byte_is_detected_at_its_offset() {
        let mut check = EchoCheck::new(Pattern::new(9, 9));
        let mut echo = send(&mut check, 3000);
        echo[2049] ^= 0x01;
        check.record_received(&echo[..2000]).unwrap();
        assert_eq!(
            check.record_received(&echo[2000..]),
            Err(Violation::Mismatch { offset: 2049 })
        );
    }

    #[test]
    fn short_read_is_detected_at_eof() {
        let mut check = EchoCheck::new(Pattern::new(4, 4));
        let echo = send(&mut check, 64);
        check.record_received(&echo[..63]).unwrap();
        assert_eq!(check.outstanding(), 1);
        assert_eq!(check.finish(), Err(Violation::Short { missing: 1 }));
    }

    #[test]
    fn lost_byte_shifts_and_is_detected() {
        let mut check = EchoCheck::new(Pattern::new(4, 4));
        let echo = send(&mut check, 64);
        let mut lossy = echo.clone();
        lossy.remove(10);
        assert!(matches!(
            check.record_received(&lossy),
            Err(Violation::Mismatch { offset }) if offset >= 10
        ));
    }

    #[test]
    fn bytes_of_another_connection_are_detected() {
        let mut mine = EchoCheck::new(Pattern::new(5, 1));
        let mut other = EchoCheck::new(Pattern::new(5, 2));
        send(&mut mine, 64);
        let theirs = send(&mut other, 64);
        assert!(matches!(
            mine.record_received(&theirs),
            Err(Violation::Mismatch { .. })
        ));
    }

    #[test]
    fn excess_bytes_are_detected() {
        let mut check = EchoCheck::new(Pattern::new(6, 6));
        let mut echo = send(&mut check, 16);
        echo.push(0);
        assert_eq!(
            check.record_received(&echo),
            Err(Violation::Excess { offset: 16 })
        );
    }

    #[test]
    fn bytes_before_any_send_are_excess() {
        let mut check = EchoCheck::new(Pattern::new(6, 6));
        assert_eq!(
            check.record_received(b"hello"),
            Err(Violation::Excess { offset: 0 })
        );
    }
}
