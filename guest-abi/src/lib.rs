//! The contract between Ferry's VMM and the `service` guest program (`guest/`): where things are
//! in guest-physical memory, what the VMM tells the guest at boot, and which ports the guest
//! serves. `#![no_std]` and dependency-free, so both the agent and the guest build it.
//!
//! Memory map of a service guest (identity-mapped; the guest runs at CPL3 in long mode):
//!
//! ```text
//! 0x0000_1000  GDT, TSS + I/O bitmap, page tables   (VMM scaffolding, as for every long-user guest)
//! 0x003f_f000  BootInfo (one page, read-only by convention); rdi = its address at entry
//! 0x0040_0000  the guest program (flat binary, entry = first byte)
//! 0x0100_0000  guest heap: stack, DMA buffers, virtqueues (HEAP_START..HEAP_END)
//! 0x0200_0000  working set the guest dirties (WORKING_SET_START..end of low memory)
//! 0xd000_0000  virtio-mmio devices, one 4 KiB window each (MMIO_BASE + i * MMIO_STRIDE)
//! ```
//!
//! At entry: CPL3, 64-bit, `rip = PROGRAM_ADDR`, `rsp = HEAP_END`, `rdi = BOOT_INFO_ADDR`,
//! RFLAGS.IF = 0, IOPL = 3 (port I/O allowed); the first 4 GiB are identity-mapped user-accessible.
//!
//! The guest runs with interrupts off and polls its virtqueues; the devices still implement the
//! virtio-mmio interrupt status register, so a Linux guest (given
//! `virtio_mmio.device=4K@0xd0000000:5` on hardware virtualization) would drive them unchanged.

#![no_std]

pub mod service;

/// Guest-physical address of [`BootInfo`]; also passed in `rdi` at entry.
pub const BOOT_INFO_ADDR: u64 = 0x003f_f000;
/// Where the guest program is loaded and entered.
pub const PROGRAM_ADDR: u64 = 0x0040_0000;
/// The guest's heap: DMA buffers and virtqueues in `HEAP_START..STACK_BOTTOM`, the stack above
/// (`rsp = HEAP_END` at entry, growing down to `STACK_BOTTOM`).
pub const HEAP_START: u64 = 0x0100_0000;
pub const STACK_BOTTOM: u64 = 0x01f0_0000;
pub const HEAP_END: u64 = 0x0200_0000;
/// The working set the guest keeps dirtying starts here.
pub const WORKING_SET_START: u64 = 0x0200_0000;
/// The smallest memory a service guest can have (program, heap and a little working set).
pub const MIN_MEMORY: u64 = 64 << 20;

/// First virtio-mmio window, and the distance between windows.
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_STRIDE: u64 = 0x1000;
/// Window index of the network device and of the block device.
pub const NET_SLOT: u64 = 0;
pub const BLK_SLOT: u64 = 1;

/// I/O port of the serial console (16550 THR) and of the yield port (`out 0xf0, eax`: sleep
/// up to `eax` TSC cycles; the VMM wakes the vCPU early when a device has work for it).
pub const SERIAL_PORT: u16 = 0x3f8;
pub const YIELD_PORT: u16 = 0xf0;

/// Ports the guest serves on its address.
pub const UDP_ECHO_PORT: u16 = 7;
pub const TCP_ECHO_PORT: u16 = 7;
/// TCP: numbered, checksummed [`CounterRecord`]s as fast as the client reads.
pub const COUNTER_PORT: u16 = 19;
/// UDP: any datagram is answered with the last durable journal record (a [`JournalStatus`]).
pub const JOURNAL_PORT: u16 = 5000;

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"FERRYSV1");
/// `BootInfo::version` this build writes and reads.
pub const BOOT_VERSION: u32 = 1;

/// What the VMM tells the guest at boot, at [`BOOT_INFO_ADDR`]. Little-endian, `repr(C)`, no
/// padding holes (every gap is an explicit field).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    /// Size of this struct as written by the VMM (forward compatibility).
    pub size: u32,
    /// TSC frequency, for the guest's clock (`rdtsc / tsc_khz` = ms).
    pub tsc_khz: u64,
    /// Guest memory below the MMIO hole, in bytes (the working set ends here).
    pub low_memory_end: u64,
    /// The guest's IPv4 address, prefix length and gateway (0.0.0.0 = none).
    pub ipv4: [u8; 4],
    pub prefix_len: u8,
    pub _pad0: [u8; 3],
    pub gateway: [u8; 4],
    /// MAC of the NIC (also in the virtio-net config space).
    pub mac: [u8; 6],
    pub _pad1: [u8; 6],
    /// Guest-physical address of the virtio-net and virtio-blk windows; 0 = no such device.
    pub net_mmio: u64,
    pub blk_mmio: u64,
    /// Journal records to append per second (0 = no journal).
    pub journal_rate: u32,
    /// Working set to dirty, MiB, and the rate to dirty it at, MiB/s (0 = idle).
    pub working_set_mib: u32,
    pub dirty_rate_mib: u32,
    pub _pad2: u32,
}

impl BootInfo {
    pub const SIZE: usize = core::mem::size_of::<BootInfo>();

    /// The struct as little-endian bytes (what the VMM writes into guest memory).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let mut w = Writer {
            buf: &mut out,
            at: 0,
        };
        w.put(&self.magic.to_le_bytes());
        w.put(&self.version.to_le_bytes());
        w.put(&self.size.to_le_bytes());
        w.put(&self.tsc_khz.to_le_bytes());
        w.put(&self.low_memory_end.to_le_bytes());
        w.put(&self.ipv4);
        w.put(&[self.prefix_len]);
        w.put(&self._pad0);
        w.put(&self.gateway);
        w.put(&self.mac);
        w.put(&self._pad1);
        w.put(&self.net_mmio.to_le_bytes());
        w.put(&self.blk_mmio.to_le_bytes());
        w.put(&self.journal_rate.to_le_bytes());
        w.put(&self.working_set_mib.to_le_bytes());
        w.put(&self.dirty_rate_mib.to_le_bytes());
        w.put(&self._pad2.to_le_bytes());
        out
    }

    /// Parse what [`to_bytes`](Self::to_bytes) wrote; `None` on a wrong magic or version.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Option<BootInfo> {
        let mut r = Reader { buf: b, at: 0 };
        let info = BootInfo {
            magic: u64::from_le_bytes(r.take()),
            version: u32::from_le_bytes(r.take()),
            size: u32::from_le_bytes(r.take()),
            tsc_khz: u64::from_le_bytes(r.take()),
            low_memory_end: u64::from_le_bytes(r.take()),
            ipv4: r.take(),
            prefix_len: r.take::<1>()[0],
            _pad0: r.take(),
            gateway: r.take(),
            mac: r.take(),
            _pad1: r.take(),
            net_mmio: u64::from_le_bytes(r.take()),
            blk_mmio: u64::from_le_bytes(r.take()),
            journal_rate: u32::from_le_bytes(r.take()),
            working_set_mib: u32::from_le_bytes(r.take()),
            dirty_rate_mib: u32::from_le_bytes(r.take()),
            _pad2: u32::from_le_bytes(r.take()),
        };
        (info.magic == BOOT_MAGIC && info.version == BOOT_VERSION).then_some(info)
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}
impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}
impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        out
    }
}

/// A record of the TCP counter stream: 16 bytes, little-endian:
/// `seq: u64`, `!seq: u32` (low 32 bits inverted), `crc: u32` (FNV-1a of the first 12 bytes).
pub const COUNTER_RECORD: usize = 16;

pub fn counter_record(seq: u64) -> [u8; COUNTER_RECORD] {
    let mut r = [0u8; COUNTER_RECORD];
    r[..8].copy_from_slice(&seq.to_le_bytes());
    r[8..12].copy_from_slice(&(!(seq as u32)).to_le_bytes());
    let c = fnv1a(&r[..12]);
    r[12..].copy_from_slice(&c.to_le_bytes());
    r
}

/// The sequence number of a counter record, `None` if it does not check out.
pub fn parse_counter_record(r: &[u8; COUNTER_RECORD]) -> Option<u64> {
    let seq = u64::from_le_bytes(r[..8].try_into().ok()?);
    let inv = u32::from_le_bytes(r[8..12].try_into().ok()?);
    let crc = u32::from_le_bytes(r[12..].try_into().ok()?);
    (inv == !(seq as u32) && crc == fnv1a(&r[..12])).then_some(seq)
}

/// A journal record on disk: one 512-byte sector, little-endian:
/// `magic "FJRN"`, `seq: u64`, `crc: u32` over bytes 0..12 and the fill, fill = seq-derived bytes.
pub const SECTOR: usize = 512;
pub const JOURNAL_MAGIC: u32 = u32::from_le_bytes(*b"FJRN");

/// Record `seq` lives in sector `seq` (sector 0 is record 0). Bytes: magic(4) seq(8) crc(4) fill.
pub fn journal_record(seq: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    s[..4].copy_from_slice(&JOURNAL_MAGIC.to_le_bytes());
    s[4..12].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in s[16..].iter_mut().enumerate() {
        *b = (seq as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    let c = fnv1a_parts(&s[..12], &s[16..]);
    s[12..16].copy_from_slice(&c.to_le_bytes());
    s
}

/// The sequence number of a journal sector, `None` if empty or corrupt.
pub fn parse_journal_record(s: &[u8; SECTOR]) -> Option<u64> {
    if u32::from_le_bytes(s[..4].try_into().ok()?) != JOURNAL_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(s[4..12].try_into().ok()?);
    let crc = u32::from_le_bytes(s[12..16].try_into().ok()?);
    (crc == fnv1a_parts(&s[..12], &s[16..]) && *s == journal_record(seq)).then_some(seq)
}

/// Answer on [`JOURNAL_PORT`]: `b"FJST"`, last durable seq + 1 (0 = none yet) as u64, the
/// number of records verified at boot as u64, and a u32 flag (1 = the boot check passed).
pub const JOURNAL_STATUS: usize = 24;

pub fn fnv1a(b: &[u8]) -> u32 {
    fnv1a_parts(b, &[])
}

fn fnv1a_parts(a: &[u8], b: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &x in a.iter().chain(b) {
        h ^= x as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_round_trips_and_has_no_holes() {
        assert_eq!(BootInfo::SIZE, 88);
        let b = BootInfo {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            size: BootInfo::SIZE as u32,
            tsc_khz: 2_000_000,
            low_memory_end: 256 << 20,
            ipv4: [198, 18, 2, 10],
            prefix_len: 24,
            _pad0: [0; 3],
            gateway: [0; 4],
            mac: [0x52, 0x54, 0, 1, 2, 3],
            _pad1: [0; 6],
            net_mmio: MMIO_BASE,
            blk_mmio: MMIO_BASE + MMIO_STRIDE,
            journal_rate: 200,
            working_set_mib: 64,
            dirty_rate_mib: 16,
            _pad2: 0,
        };
        assert_eq!(BootInfo::from_bytes(&b.to_bytes()), Some(b));
        let mut bad = b.to_bytes();
        bad[0] ^= 1;
        assert_eq!(BootInfo::from_bytes(&bad), None);
    }

    #[test]
    fn records_check_out_and_detect_damage() {
        for seq in [0u64, 1, 77, u64::MAX] {
            assert_eq!(parse_counter_record(&counter_record(seq)), Some(seq));
            assert_eq!(parse_journal_record(&journal_record(seq)), Some(seq));
        }
        let mut r = counter_record(5);
        r[3] ^= 0x10;
        assert_eq!(parse_counter_record(&r), None);
        let mut s = journal_record(5);
        s[300] ^= 1;
        assert_eq!(parse_journal_record(&s), None);
        assert_eq!(parse_journal_record(&[0u8; SECTOR]), None);
    }
}
