//! Ferry's service guest: a `no_std` program that runs at CPL3 in long mode on Ferry's VMM and
//! gives a migration something to keep alive, seen from outside. On its IPv4 address it serves
//! ICMP echo, UDP echo (7), TCP echo (7, several connections), a TCP counter stream (19: numbered,
//! checksummed records as fast as the client reads), and the journal status (UDP 5000); it
//! appends a journal to its disk at a steady rate and dirties a working set. The contract with
//! the VMM (memory map, BootInfo, device windows, ports, record formats) is `ferry-guest-abi`.
//!
//! Interrupts are off: the program polls its virtqueues' used rings (memory, not MMIO) and,
//! when nothing is due, yields to the VMM with `out 0xf0, eax` (woken early by device work).
//! Every part is optional: without a NIC it serves nothing, without a disk it keeps no journal,
//! and without BootInfo (started as a plain `raw --mode long-user` image) it says so and idles.
//!
//! Built by `cargo xtask build-guest` (see `xtask/src/guest.rs`), not by the workspace.

#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

/// The contract with the VMM: `guest-abi/src/lib.rs` (crate `ferry-guest-abi`), compiled into
/// this crate as a module so the image does not depend on the checkout's path (guest/Cargo.toml).
#[allow(unused_attributes, dead_code, clippy::wrong_self_convention)]
#[path = "../../guest-abi/src/lib.rs"]
mod ferry_guest_abi;

mod arch;
mod blk;
mod journal;
mod mem;
mod net;
mod services;

use core::ptr::NonNull;

use ferry_guest_abi::service::Pacer;
use ferry_guest_abi::{BootInfo, BOOT_INFO_ADDR, WORKING_SET_START};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};

use arch::{yield_cycles, Clock};

const VERSION: &str = env!("CARGO_PKG_VERSION");

// Entry: rdi = BootInfo's address. Without BootInfo (a plain long-user raw image, rsp in the
// scaffolding's low page), take a stack below BOOT_INFO_ADDR, clear of the page tables. Zero
// .bss (not in the flat image), then call guest_main(rdi); it never returns.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    mov rax, {boot}",
    "    cmp rdi, rax",
    "    je 2f",
    "    mov rsp, rax",
    "2:",
    "    and rsp, -16",
    "    mov r12, rdi",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    xor eax, eax",
    "    cld",
    "    rep stosb",
    "    mov rdi, r12",
    "    call {main}",
    "3:",
    "    jmp 3b",
    boot = const BOOT_INFO_ADDR,
    main = sym guest_main,
);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("ferry-guest: PANIC: {info}");
    idle_forever()
}

fn idle_forever() -> ! {
    loop {
        yield_cycles(u32::MAX as u64);
    }
}

extern "C" fn guest_main(boot: u64) -> ! {
    println!("ferry-guest {VERSION}: service guest starting");
    let Some(info) = read_boot_info(boot) else {
        idle_forever()
    };
    let ip = info.ipv4;
    println!(
        "ferry-guest: ip {}.{}.{}.{}/{} net {:#x} blk {:#x} journal {}/s working set {} MiB at {} MiB/s tsc {} kHz",
        ip[0], ip[1], ip[2], ip[3], info.prefix_len, info.net_mmio, info.blk_mmio,
        info.journal_rate, info.working_set_mib, info.dirty_rate_mib, info.tsc_khz
    );
    let tsc_khz = if info.tsc_khz == 0 {
        println!("ferry-guest: BootInfo has no TSC frequency; assuming 1 GHz (times will be off)");
        1_000_000
    } else {
        info.tsc_khz
    };
    let clock = Clock::new(tsc_khz);

    let net = if info.net_mmio == 0 {
        println!("ferry-guest: no network device; not serving");
        None
    } else {
        match transport(info.net_mmio, DeviceType::Network)
            .and_then(|t| VirtIONetRaw::new(t).map_err(|e| Bad::Driver("virtio-net", e)))
            .and_then(|raw| net::NetDev::new(raw).map_err(|e| Bad::Driver("virtio-net", e)))
        {
            Ok(d) => Some(d),
            Err(e) => {
                println!(
                    "ferry-guest: network device at {:#x}: {e}; not serving",
                    info.net_mmio
                );
                None
            }
        }
    };
    let journal = if info.blk_mmio == 0 {
        println!("journal: no disk; no journal");
        None
    } else {
        match transport(info.blk_mmio, DeviceType::Block)
            .and_then(|t| blk::Blk::new(t).map_err(Bad::Blk))
        {
            Ok(blk) => Some(journal::Journal::start(blk, info.journal_rate, clock)),
            Err(e) => {
                println!(
                    "journal: block device at {:#x}: {e}; no journal",
                    info.blk_mmio
                );
                None
            }
        }
    };
    let mut dirtier = Dirtier::new(&info, clock.now_us());
    let mut svc = net.map(|dev| services::Services::new(dev, &info, clock.now_us()));
    if let Some(s) = &svc {
        let m = s.mac();
        if m != info.mac {
            println!(
                "ferry-guest: the NIC's MAC {m:02x?} differs from BootInfo's {:02x?}; using the NIC's",
                info.mac
            );
        }
    }
    println!(
        "ferry-guest: ready ({} KiB of heap left)",
        mem::left() / 1024
    );
    main_loop(&clock, &mut svc, journal, &mut dirtier)
}

fn main_loop(
    clock: &Clock,
    svc: &mut Option<services::Services>,
    mut journal: Option<journal::Journal>,
    dirtier: &mut Dirtier,
) -> ! {
    // Spin (instead of yielding) when the next thing is due this soon.
    const SPIN_US: u64 = 50;
    // Never sleep longer than this, so the clock-driven work stays on time.
    const MAX_SLEEP_US: u64 = 100_000;
    let mut spins = 0u32;
    loop {
        let now = clock.now_us();
        let mut busy = false;
        let status = journal.as_ref().map(|j| j.status());
        if let Some(s) = svc.as_mut() {
            busy |= s.poll(now, status);
        }
        if let Some(j) = journal.as_mut() {
            busy |= j.step(clock.now_us());
        }
        busy |= dirtier.step(clock.now_us());
        if busy {
            spins = 0;
            continue;
        }
        let now = clock.now_us();
        let mut wait = MAX_SLEEP_US;
        if let Some(s) = svc.as_mut() {
            wait = wait.min(s.until_next_us(now));
        }
        if let Some(j) = &journal {
            if let Some(w) = j.until_next_us(now) {
                wait = wait.min(w);
            }
        }
        if let Some(w) = dirtier.until_next_us(now) {
            wait = wait.min(w);
        }
        let in_flight = journal.as_ref().is_some_and(|j| j.busy())
            || svc.as_ref().is_some_and(|s| s.tx_in_flight());
        if wait <= SPIN_US || (in_flight && spins < 2000) {
            // Something is due right away, or the device is working on our buffers: spin
            // briefly (the used rings are memory; no exit), then sleep.
            spins += 1;
            core::hint::spin_loop();
            continue;
        }
        spins = 0;
        yield_cycles(clock.us_to_cycles(wait));
    }
}

#[derive(Debug)]
enum Bad {
    Mmio(virtio_drivers::transport::mmio::MmioError),
    Kind(DeviceType, DeviceType),
    Driver(&'static str, virtio_drivers::Error),
    Blk(blk::BlkError),
}

impl core::fmt::Display for Bad {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Bad::Mmio(e) => write!(f, "not a virtio-mmio device: {e}"),
            Bad::Kind(want, got) => write!(f, "expected a {want:?} device, found {got:?}"),
            Bad::Driver(d, e) => write!(f, "{d} driver: {e}"),
            Bad::Blk(e) => write!(f, "virtio-blk driver: {e}"),
        }
    }
}

fn transport(addr: u64, want: DeviceType) -> Result<MmioTransport<'static>, Bad> {
    let header = NonNull::new(addr as usize as *mut VirtIOHeader).ok_or(Bad::Kind(want, want))?;
    // SAFETY: BootInfo names this 4 KiB window as a virtio-mmio device's; it is identity-mapped
    // device memory that nothing else in the program touches, for the life of the program.
    let t = unsafe { MmioTransport::new(header, ferry_guest_abi::MMIO_STRIDE as usize) }
        .map_err(Bad::Mmio)?;
    if t.device_type() != want {
        return Err(Bad::Kind(want, t.device_type()));
    }
    Ok(t)
}

/// BootInfo from `rdi`. A VMM that writes BootInfo passes its address; with `rdi = 0` (a plain
/// `raw --mode long-user` start) a valid BootInfo already at BOOT_INFO_ADDR is still used (a
/// test can place one there), otherwise the program says it has none and idles.
fn read_boot_info(addr: u64) -> Option<BootInfo> {
    if addr != BOOT_INFO_ADDR && addr != 0 {
        println!(
            "ferry-guest: no BootInfo (rdi = {addr:#x}, expected {BOOT_INFO_ADDR:#x}): not started as a service guest; nothing to serve, idling"
        );
        return None;
    }
    let mut b = [0u8; BootInfo::SIZE];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: the BootInfo page is identity-mapped guest memory below the program; volatile
        // because the compiler knows nothing of who wrote it.
        *x = unsafe { core::ptr::read_volatile((BOOT_INFO_ADDR as usize + i) as *const u8) };
    }
    let info = BootInfo::from_bytes(&b);
    match (info.is_some(), addr) {
        (true, _) => {}
        (false, 0) => println!(
            "ferry-guest: no BootInfo (rdi = 0, nothing valid at {BOOT_INFO_ADDR:#x}): not started as a service guest; nothing to serve, idling"
        ),
        (false, _) => println!(
            "ferry-guest: no valid BootInfo at {BOOT_INFO_ADDR:#x} (magic or version mismatch: this program speaks version {}); idling",
            ferry_guest_abi::BOOT_VERSION
        ),
    }
    info
}

/// Dirties the working set at the requested rate: one 8-byte write per 4 KiB page, pages in
/// order, in slices so the network is polled in between.
struct Dirtier {
    base: u64,
    pages: u64,
    cursor: u64,
    pass: u64,
    pacer: Pacer,
}

impl Dirtier {
    /// Pages per step: a few hundred microseconds of work at most.
    const SLICE: u64 = 256;

    fn new(info: &BootInfo, now_us: u64) -> Dirtier {
        let room = info.low_memory_end.saturating_sub(WORKING_SET_START) / mem::PAGE;
        let pages = (info.working_set_mib as u64 * 256).min(room);
        if info.working_set_mib as u64 * 256 > room {
            println!(
                "ferry-guest: working set cut to {} MiB (memory ends at {:#x})",
                pages / 256,
                info.low_memory_end
            );
        }
        let per_sec = if pages == 0 {
            0
        } else {
            info.dirty_rate_mib as u64 * 256
        };
        Dirtier {
            base: WORKING_SET_START,
            pages,
            cursor: 0,
            pass: 1,
            // At most 50 ms of backlog: after a pause, go on at the rate rather than burst.
            pacer: Pacer::new(per_sec, now_us, (per_sec / 20).max(1)),
        }
    }

    fn step(&mut self, now_us: u64) -> bool {
        let n = self.pacer.due(now_us).min(Self::SLICE);
        if n == 0 {
            return false;
        }
        for _ in 0..n {
            let p = (self.base + self.cursor * mem::PAGE) as *mut u64;
            // SAFETY: the page lies in WORKING_SET_START..low_memory_end (pages is clipped to
            // it), identity-mapped guest memory that only this loop uses.
            unsafe { core::ptr::write_volatile(p, self.pass ^ self.cursor) };
            self.cursor += 1;
            if self.cursor == self.pages {
                self.cursor = 0;
                self.pass += 1;
            }
        }
        self.pacer.take(n);
        true
    }

    fn until_next_us(&self, now_us: u64) -> Option<u64> {
        self.pacer.until_next_us(now_us)
    }
}
