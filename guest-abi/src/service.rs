//! Logic of the service guest that the host can test too (the guest links this crate as is):
//! the journal's boot check, the journal status answer, and pacing of work at a steady rate.

use core::fmt;

use super::{parse_journal_record, JOURNAL_STATUS, SECTOR};

/// The answer on [`JOURNAL_PORT`](crate::JOURNAL_PORT), as a struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalStatus {
    /// Last durable seq + 1 (0 = nothing durable yet). Every record below it was flushed.
    pub next_seq: u64,
    /// Records found and verified at boot.
    pub verified: u64,
    /// The boot check passed (the journal on disk was contiguous and intact).
    pub check_passed: bool,
}

/// First four bytes of a [`JournalStatus`] message.
pub const JOURNAL_STATUS_MAGIC: [u8; 4] = *b"FJST";

impl JournalStatus {
    pub fn to_bytes(&self) -> [u8; JOURNAL_STATUS] {
        let mut b = [0u8; JOURNAL_STATUS];
        b[..4].copy_from_slice(&JOURNAL_STATUS_MAGIC);
        b[4..12].copy_from_slice(&self.next_seq.to_le_bytes());
        b[12..20].copy_from_slice(&self.verified.to_le_bytes());
        b[20..24].copy_from_slice(&(self.check_passed as u32).to_le_bytes());
        b
    }

    /// Parse a datagram; `None` unless it is exactly a status message.
    pub fn from_bytes(b: &[u8]) -> Option<JournalStatus> {
        if b.len() != JOURNAL_STATUS || b[..4] != JOURNAL_STATUS_MAGIC {
            return None;
        }
        let flag = u32::from_le_bytes(b[20..24].try_into().ok()?);
        if flag > 1 {
            return None;
        }
        Some(JournalStatus {
            next_seq: u64::from_le_bytes(b[4..12].try_into().ok()?),
            verified: u64::from_le_bytes(b[12..20].try_into().ok()?),
            check_passed: flag == 1,
        })
    }
}

/// What the boot check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalCheck {
    /// Records 0..records are intact in sectors 0..records, and what follows is empty.
    Ok { records: u64 },
    /// Sector `sector` holds neither a valid record nor zeros.
    Corrupt { sector: u64 },
    /// Sector `sector` holds a valid record, but of sequence number `seq`.
    OutOfOrder { sector: u64, seq: u64 },
    /// The journal ends at `records`, but sector `sector` past the end is not empty (a write
    /// that should have come before it was lost).
    Gap { records: u64, sector: u64 },
}

impl JournalCheck {
    pub fn passed(&self) -> bool {
        matches!(self, JournalCheck::Ok { .. })
    }

    /// Records that can be trusted: all of them when the check passed, else those before the
    /// damage.
    pub fn records(&self) -> u64 {
        match *self {
            JournalCheck::Ok { records } | JournalCheck::Gap { records, .. } => records,
            JournalCheck::Corrupt { sector } | JournalCheck::OutOfOrder { sector, .. } => sector,
        }
    }
}

impl fmt::Display for JournalCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            JournalCheck::Ok { records } => write!(f, "{records} records verified"),
            JournalCheck::Corrupt { sector } => write!(
                f,
                "check FAILED: sector {sector} is neither a valid record nor empty"
            ),
            JournalCheck::OutOfOrder { sector, seq } => write!(
                f,
                "check FAILED: sector {sector} holds record {seq}, expected record {sector}"
            ),
            JournalCheck::Gap { records, sector } => write!(
                f,
                "check FAILED: the journal ends after {records} records but sector {sector} is not empty (a record was lost)"
            ),
        }
    }
}

/// How many sectors past the end of the journal the boot check looks at (they must be empty).
pub const JOURNAL_TAIL_CHECK: u64 = 64;

/// The journal's boot check, fed one sector at a time from sector 0 on.
#[derive(Debug, Clone)]
pub struct JournalScan {
    next: u64,
    state: ScanState,
}

#[derive(Debug, Clone, Copy)]
enum ScanState {
    Records,
    Tail { records: u64 },
    Done(JournalCheck),
}

impl Default for JournalScan {
    fn default() -> Self {
        Self::new()
    }
}

impl JournalScan {
    pub fn new() -> Self {
        JournalScan {
            next: 0,
            state: ScanState::Records,
        }
    }

    /// The sector to feed next.
    pub fn next_sector(&self) -> u64 {
        self.next
    }

    /// Whether the scan wants more sectors (false once it has its answer).
    pub fn wants_more(&self) -> bool {
        !matches!(self.state, ScanState::Done(_))
    }

    /// Feed sector [`next_sector`](Self::next_sector).
    pub fn feed(&mut self, s: &[u8; SECTOR]) {
        let sector = self.next;
        self.next += 1;
        let empty = s.iter().all(|&b| b == 0);
        self.state = match self.state {
            ScanState::Records if empty => ScanState::Tail { records: sector },
            ScanState::Records => match parse_journal_record(s) {
                Some(seq) if seq == sector => ScanState::Records,
                Some(seq) => ScanState::Done(JournalCheck::OutOfOrder { sector, seq }),
                None => ScanState::Done(JournalCheck::Corrupt { sector }),
            },
            ScanState::Tail { records } if !empty => {
                ScanState::Done(JournalCheck::Gap { records, sector })
            }
            ScanState::Tail { records } if sector + 1 >= records + 1 + JOURNAL_TAIL_CHECK => {
                ScanState::Done(JournalCheck::Ok { records })
            }
            s => s,
        };
    }

    /// The answer; call when [`wants_more`](Self::wants_more) is false or at the end of the
    /// disk (then a disk full of records is a passed check).
    pub fn finish(&self) -> JournalCheck {
        match self.state {
            ScanState::Done(c) => c,
            ScanState::Tail { records } => JournalCheck::Ok { records },
            ScanState::Records => JournalCheck::Ok { records: self.next },
        }
    }
}

/// Work paced at a steady rate (journal records, pages dirtied): how many units are due by
/// now. A backlog larger than `max_backlog` (the guest was paused, e.g. across a migration's
/// switchover, or could not keep up) is forgotten rather than done in one burst.
#[derive(Debug, Clone)]
pub struct Pacer {
    per_sec: u64,
    start_us: u64,
    done: u64,
    max_backlog: u64,
}

impl Pacer {
    pub fn new(per_sec: u64, now_us: u64, max_backlog: u64) -> Pacer {
        Pacer {
            per_sec,
            start_us: now_us,
            done: 0,
            max_backlog: max_backlog.max(1),
        }
    }

    fn target(&self, now_us: u64) -> u64 {
        let t = now_us.saturating_sub(self.start_us) as u128 * self.per_sec as u128 / 1_000_000;
        t.min(u64::MAX as u128) as u64
    }

    /// Units due now (at most `max_backlog`).
    pub fn due(&mut self, now_us: u64) -> u64 {
        if self.per_sec == 0 {
            return 0;
        }
        let target = self.target(now_us);
        if target > self.done.saturating_add(self.max_backlog) {
            self.done = target - self.max_backlog;
        }
        target.saturating_sub(self.done)
    }

    /// Record that `n` units were done.
    pub fn take(&mut self, n: u64) {
        self.done = self.done.saturating_add(n);
    }

    /// Microseconds from `now_us` until the next unit is due (0 if one is due now, `None` if
    /// the rate is 0).
    pub fn until_next_us(&self, now_us: u64) -> Option<u64> {
        if self.per_sec == 0 {
            return None;
        }
        if self.target(now_us) > self.done {
            return Some(0);
        }
        // The first instant at which target() reaches done + 1.
        let at = ((self.done as u128 + 1) * 1_000_000).div_ceil(self.per_sec as u128);
        let at = (self.start_us as u128 + at).min(u64::MAX as u128) as u64;
        Some(at.saturating_sub(now_us))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::journal_record;
    use std::string::ToString;
    use std::{vec, vec::Vec};

    fn scan(disk: &[[u8; SECTOR]]) -> JournalCheck {
        let mut s = JournalScan::new();
        while s.wants_more() && (s.next_sector() as usize) < disk.len() {
            s.feed(&disk[s.next_sector() as usize]);
        }
        s.finish()
    }

    fn disk(records: u64, size: usize) -> Vec<[u8; SECTOR]> {
        let mut d = vec![[0u8; SECTOR]; size];
        for i in 0..records {
            d[i as usize] = journal_record(i);
        }
        d
    }

    #[test]
    fn journal_scan_verifies_contiguous_records() {
        assert_eq!(scan(&disk(0, 200)), JournalCheck::Ok { records: 0 });
        assert_eq!(scan(&disk(37, 200)), JournalCheck::Ok { records: 37 });
        // A disk full of records, and one whose tail is shorter than the tail check.
        assert_eq!(scan(&disk(50, 50)), JournalCheck::Ok { records: 50 });
        assert_eq!(scan(&disk(40, 45)), JournalCheck::Ok { records: 40 });
        // It stops reading once it knows.
        let mut s = JournalScan::new();
        let d = disk(10, 1000);
        while s.wants_more() {
            s.feed(&d[s.next_sector() as usize]);
        }
        assert_eq!(s.next_sector(), 10 + 1 + JOURNAL_TAIL_CHECK);
    }

    #[test]
    fn journal_scan_finds_damage() {
        let mut d = disk(20, 200);
        d[7][100] ^= 1;
        let c = scan(&d);
        assert_eq!(c, JournalCheck::Corrupt { sector: 7 });
        assert!(!c.passed());
        assert_eq!(c.records(), 7);

        let mut d = disk(20, 200);
        d[5] = journal_record(6);
        assert_eq!(scan(&d), JournalCheck::OutOfOrder { sector: 5, seq: 6 });

        // Record 12 lost, 13.. still there.
        let mut d = disk(20, 200);
        d[12] = [0; SECTOR];
        let c = scan(&d);
        assert_eq!(
            c,
            JournalCheck::Gap {
                records: 12,
                sector: 13
            }
        );
        assert!(c.to_string().contains("lost"), "{c}");
    }

    #[test]
    fn journal_status_round_trips_and_rejects_junk() {
        let s = JournalStatus {
            next_seq: 1234,
            verified: 1000,
            check_passed: true,
        };
        let b = s.to_bytes();
        assert_eq!(&b[..4], b"FJST");
        assert_eq!(JournalStatus::from_bytes(&b), Some(s));
        assert_eq!(JournalStatus::from_bytes(&b[..20]), None);
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(JournalStatus::from_bytes(&bad), None);
        let mut bad = b;
        bad[20] = 7;
        assert_eq!(JournalStatus::from_bytes(&bad), None);
    }

    #[test]
    fn pacer_keeps_the_rate_and_forgets_a_long_pause() {
        // 200 per second from t = 1 s.
        let mut p = Pacer::new(200, 1_000_000, 100);
        assert_eq!(p.due(1_000_000), 0);
        assert_eq!(p.until_next_us(1_000_000), Some(5_000));
        assert_eq!(p.due(1_004_999), 0);
        assert_eq!(p.due(1_005_000), 1);
        p.take(1);
        assert_eq!(p.due(1_005_000), 0);
        assert_eq!(p.until_next_us(1_005_000), Some(5_000));
        assert_eq!(p.due(1_100_000), 19);
        p.take(19);
        // A 10 s pause: only max_backlog is due, and the rate goes on from there.
        assert_eq!(p.due(11_100_000), 100);
        p.take(100);
        assert_eq!(p.due(11_100_000), 0);
        assert_eq!(p.due(11_105_000), 1);
        // Rate 0: nothing, ever.
        let mut z = Pacer::new(0, 0, 10);
        assert_eq!(z.due(u64::MAX), 0);
        assert_eq!(z.until_next_us(5), None);
        // Huge rates and times do not overflow.
        let mut h = Pacer::new(u64::MAX, 0, 1 << 20);
        assert_eq!(h.due(u64::MAX), 1 << 20);
    }
}
