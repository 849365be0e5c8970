//! The disk journal on the virtio-blk device: record `seq` in sector `seq`, checked at boot,
//! appended at a steady rate, each batch written and then flushed before it counts as durable.
//! Both the write and the flush are submitted without waiting (`blk.rs`), so the network is
//! served while the device works.

use crate::ferry_guest_abi::service::{JournalScan, JournalStatus, Pacer};
use crate::ferry_guest_abi::{journal_record, SECTOR};

use crate::arch::Clock;
use crate::blk::{Blk, BlkError};
use crate::mem;
use crate::println;

/// Most records written (and then flushed) at once: a small batch when the disk lags.
const BATCH: usize = 16;
/// How long to sleep at most while a request is in flight.
const IN_FLIGHT_POLL_US: u64 = 5_000;
/// Sectors read per request during the boot check.
const SCAN_CHUNK: usize = 64;

enum State {
    Idle,
    Writing {
        n: usize,
    },
    Flushing {
        n: usize,
    },
    /// Not appending any more (disk full, check failed, I/O error); said once on the console.
    Stopped,
}

pub struct Journal {
    blk: Blk,
    capacity: u64,
    /// Records durable (flushed): 0..durable.
    durable: u64,
    verified: u64,
    passed: bool,
    pacer: Pacer,
    state: State,
    buf: &'static mut [u8],
    clock: Clock,
    /// When the flush in flight was submitted, and the longest flush since the last console
    /// line, microseconds.
    flush_start_us: u64,
    flush_max_us: u64,
}

impl Journal {
    /// Check the journal on `blk` and get ready to append `rate` records per second.
    pub fn start(mut blk: Blk, rate: u32, clock: Clock) -> Journal {
        let capacity = blk.capacity();
        let buf = mem::alloc_bytes(SCAN_CHUNK * SECTOR, mem::PAGE);
        println!(
            "journal: disk of {capacity} sectors ({} KiB){}{}",
            capacity / 2,
            if blk.readonly() { ", read-only" } else { "" },
            if blk.has_flush() {
                ""
            } else {
                ", no flush (a completed write counts as durable)"
            }
        );
        let mut scan = JournalScan::new();
        let mut read_error = None;
        while scan.wants_more() && scan.next_sector() < capacity {
            let at = scan.next_sector();
            let n = (capacity - at).min(SCAN_CHUNK as u64) as usize;
            if let Err(e) = blk.read_blocking(at, &mut buf[..n * SECTOR], &clock) {
                read_error = Some((at, e));
                break;
            }
            for s in buf[..n * SECTOR].chunks_exact(SECTOR) {
                if !scan.wants_more() {
                    break;
                }
                scan.feed(s.try_into().expect("a sector"));
            }
        }
        let check = scan.finish();
        let (passed, verified) = match &read_error {
            Some((at, e)) => {
                println!("journal: check FAILED: reading sector {at}: {e}; not appending");
                (false, 0)
            }
            None => {
                println!("journal: {check}");
                (check.passed(), check.records())
            }
        };
        let state = if !passed {
            if read_error.is_none() {
                println!("journal: not appending to a damaged journal");
            }
            State::Stopped
        } else if blk.readonly() {
            println!("journal: the disk is read-only; not appending");
            State::Stopped
        } else if rate == 0 {
            println!("journal: rate 0; not appending");
            State::Stopped
        } else {
            println!("journal: appending {rate} records/s from record {verified}");
            State::Idle
        };
        Journal {
            blk,
            capacity,
            durable: verified,
            verified,
            passed,
            // A backlog of at most a second's records (after a long pause, go on at the rate).
            pacer: Pacer::new(rate as u64, clock.now_us(), (rate as u64).max(1)),
            state,
            buf,
            clock,
            flush_start_us: 0,
            flush_max_us: 0,
        }
    }

    pub fn status(&self) -> JournalStatus {
        JournalStatus {
            next_seq: self.durable,
            verified: self.verified,
            check_passed: self.passed,
        }
    }

    /// Whether a request is in flight (then poll again soon).
    pub fn busy(&self) -> bool {
        self.blk.busy()
    }

    /// Microseconds until there is work (None: never).
    pub fn until_next_us(&self, now_us: u64) -> Option<u64> {
        match self.state {
            State::Idle => self.pacer.until_next_us(now_us),
            // The device wakes the vCPU from its yield when it completes a request; the bound
            // only covers a lost wake-up.
            State::Writing { .. } | State::Flushing { .. } => Some(IN_FLIGHT_POLL_US),
            State::Stopped => None,
        }
    }

    /// Advance: submit the records that are due, or move a finished write on to its flush, or
    /// a finished flush to durable. Returns whether anything happened.
    pub fn step(&mut self, now_us: u64) -> bool {
        match self.state {
            State::Stopped => false,
            State::Idle => {
                let due = self.pacer.due(now_us);
                if due == 0 {
                    return false;
                }
                if self.durable >= self.capacity {
                    println!(
                        "journal: disk full after {} records ({} sectors); stopped appending",
                        self.durable, self.capacity
                    );
                    self.state = State::Stopped;
                    return true;
                }
                let n = (due.min(BATCH as u64).min(self.capacity - self.durable)) as usize;
                for i in 0..n {
                    let r = journal_record(self.durable + i as u64);
                    self.buf[i * SECTOR..(i + 1) * SECTOR].copy_from_slice(&r);
                }
                // SAFETY: buf lives for the program and is not written again until this
                // request completes (state Writing, then Flushing, then Idle refills it).
                match unsafe { self.blk.write(self.durable, &self.buf[..n * SECTOR]) } {
                    Ok(()) => {
                        self.pacer.take(n as u64);
                        self.state = State::Writing { n };
                    }
                    Err(e) => self.fail("submitting a write of", e),
                }
                true
            }
            State::Writing { n } => match self.blk.poll() {
                None => false,
                Some(Err(e)) => {
                    self.fail("writing", e);
                    true
                }
                Some(Ok(())) if !self.blk.has_flush() => {
                    self.durable_now(n);
                    true
                }
                Some(Ok(())) => {
                    self.flush_start_us = now_us;
                    match self.blk.flush() {
                        Ok(()) => self.state = State::Flushing { n },
                        Err(e) => self.fail("submitting a flush after", e),
                    }
                    true
                }
            },
            State::Flushing { n } => match self.blk.poll() {
                None => false,
                Some(Err(e)) => {
                    self.fail("flushing", e);
                    true
                }
                Some(Ok(())) => {
                    let took = self.clock.now_us().saturating_sub(self.flush_start_us);
                    self.flush_max_us = self.flush_max_us.max(took);
                    self.durable_now(n);
                    true
                }
            },
        }
    }

    fn durable_now(&mut self, n: usize) {
        let before = self.durable;
        self.durable += n as u64;
        if self.durable / 100 > before / 100 {
            println!(
                "journal: record {} durable (longest flush {} us)",
                self.durable / 100 * 100 - 1,
                self.flush_max_us
            );
            self.flush_max_us = 0;
        }
        self.state = State::Idle;
    }

    fn fail(&mut self, what: &str, e: BlkError) {
        println!(
            "journal: {what} records from {} failed: {e}; stopped appending ({} records durable)",
            self.durable, self.durable
        );
        self.state = State::Stopped;
    }
}
