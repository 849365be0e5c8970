//! The disk journal on the virtio-blk device: record `seq` in sector `seq`, checked at boot,
//! appended at a steady rate with a flush per batch. A write is submitted without blocking
//! (the network is served while it is in flight); the flush that follows is a blocking request
//! (virtio-drivers 0.12 has no non-blocking flush), so the network waits for it.

use crate::ferry_guest_abi::service::{JournalScan, JournalStatus, Pacer};
use crate::ferry_guest_abi::{journal_record, SECTOR};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::mmio::MmioTransport;

use crate::arch::Clock;
use crate::mem::{self, GuestHal};
use crate::println;

/// Most records written (and then flushed) at once: a small batch when the disk lags.
const BATCH: usize = 16;
/// Sectors read per request during the boot check.
const SCAN_CHUNK: usize = 64;

type Blk = VirtIOBlk<GuestHal, MmioTransport<'static>>;

enum State {
    Idle,
    Writing {
        token: u16,
        n: usize,
    },
    /// Not appending any more (disk full, check failed, I/O error); said once on the console.
    Stopped,
}

/// Request header, data and status of the request in flight: they must stay put until the
/// device completes it.
struct Request {
    req: BlkReq,
    resp: BlkResp,
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
    io: &'static mut Request,
    clock: Clock,
    /// Longest blocking flush since the last console line, microseconds.
    flush_max_us: u64,
}

impl Journal {
    /// Check the journal on `blk` and get ready to append `rate` records per second.
    pub fn start(mut blk: Blk, rate: u32, clock: Clock) -> Journal {
        let now_us = clock.now_us();
        let capacity = blk.capacity();
        let buf = mem::alloc_bytes(SCAN_CHUNK * SECTOR, mem::PAGE);
        let io = mem::alloc_zeroed::<Request>();
        io.req = BlkReq::default();
        io.resp = BlkResp::default();
        println!(
            "journal: disk of {capacity} sectors ({} KiB){}",
            capacity / 2,
            if blk.readonly() { ", read-only" } else { "" }
        );
        let mut scan = JournalScan::new();
        let mut read_error = None;
        while scan.wants_more() && scan.next_sector() < capacity {
            let at = scan.next_sector();
            let n = (capacity - at).min(SCAN_CHUNK as u64) as usize;
            if let Err(e) = blk.read_blocks(at as usize, &mut buf[..n * SECTOR]) {
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
        let (passed, verified) = match read_error {
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
            pacer: Pacer::new(rate as u64, now_us, (rate as u64).max(1)),
            state,
            buf,
            io,
            clock,
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
        matches!(self.state, State::Writing { .. })
    }

    /// Microseconds until there is work (None: never).
    pub fn until_next_us(&self, now_us: u64) -> Option<u64> {
        match self.state {
            State::Idle => self.pacer.until_next_us(now_us),
            State::Writing { .. } => Some(0),
            State::Stopped => None,
        }
    }

    /// Advance: complete a finished write (then flush), or submit the records that are due.
    /// Returns whether anything happened.
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
                let io = &mut *self.io;
                // SAFETY: io.req, io.resp and buf live for the program and are not touched
                // until complete_write_blocks for this token (state Writing holds them).
                let r = unsafe {
                    self.blk.write_blocks_nb(
                        self.durable as usize,
                        &mut io.req,
                        &self.buf[..n * SECTOR],
                        &mut io.resp,
                    )
                };
                match r {
                    Ok(token) => {
                        self.pacer.take(n as u64);
                        self.state = State::Writing { token, n };
                    }
                    Err(e) => self.fail("submitting a write", e),
                }
                true
            }
            State::Writing { token, n } => {
                if self.blk.peek_used() != Some(token) {
                    return false;
                }
                let io = &mut *self.io;
                // SAFETY: the same request, buffer and response given to write_blocks_nb.
                let r = unsafe {
                    self.blk.complete_write_blocks(
                        token,
                        &io.req,
                        &self.buf[..n * SECTOR],
                        &mut io.resp,
                    )
                };
                if let Err(e) = r {
                    self.fail("writing", e);
                    return true;
                }
                let t0 = self.clock.now_us();
                if let Err(e) = self.blk.flush() {
                    self.fail("flushing", e);
                    return true;
                }
                self.flush_max_us = self.flush_max_us.max(self.clock.now_us() - t0);
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
                true
            }
        }
    }

    fn fail(&mut self, what: &str, e: virtio_drivers::Error) {
        println!(
            "journal: {what} records from {} failed: {e}; stopped appending ({} records durable)",
            self.durable, self.durable
        );
        self.state = State::Stopped;
    }
}
