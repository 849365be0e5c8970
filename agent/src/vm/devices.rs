//! Emulated devices and exit accounting: a 16550-style UART at 0x3f8 whose output is the VM's
//! console, the workload guest's yield port, and counters for everything else. Unknown ports
//! read as all ones and ignore writes, as does MMIO outside the virtio windows (`virtio/`) (what an empty ISA bus does); they are counted, and the first
//! access to each is logged once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::virtio::{VirtioDevices, VirtioError, VirtioState, Waker};

pub const COM1_BASE: u16 = 0x3f8;
/// How many bytes of console output the agent keeps per VM.
pub const CONSOLE_CAPACITY: usize = 1 << 20;
/// How much of the console travels with the VM's state (save files, migration).
pub const CONSOLE_STATE_TAIL: usize = 64 << 10;
const MAX_TRACKED_PORTS: usize = 64;

const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TX_IDLE: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;
const IIR_NO_INT: u8 = 0x01;
const MSR_DCD_DSR_CTS: u8 = 0xb0;

/// Registers of the 16550 that software can set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    pub fcr: u8,
}

/// The console: a bounded byte log with absolute offsets, so readers can follow it.
#[derive(Debug, Default)]
pub struct Console {
    buf: VecDeque<u8>,
    /// Absolute offset of `buf[0]` since the VM was created.
    start: u64,
}

impl Console {
    pub fn push(&mut self, b: u8) {
        if self.buf.len() == CONSOLE_CAPACITY {
            self.buf.pop_front();
            self.start += 1;
        }
        self.buf.push_back(b);
    }
    /// Absolute offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }
    /// Bytes from absolute offset `from` (clamped to what is kept), at most `max`.
    pub fn read_from(&self, from: u64, max: usize) -> (u64, Vec<u8>) {
        let from = from.clamp(self.start, self.end());
        let skip = (from - self.start) as usize;
        (
            from,
            self.buf.iter().skip(skip).take(max).copied().collect(),
        )
    }
}

/// Exit counters of one VM.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub yields: AtomicU64,
    pub unknown_port: AtomicU64,
    pub unknown_mmio: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
    ports: Mutex<BTreeMap<u16, u64>>,
}

/// A snapshot of [`ExitCounters`] for the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStats {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub yields: u64,
    pub unknown_port: u64,
    pub unknown_mmio: u64,
    pub interrupted: u64,
    pub other: u64,
    /// Accesses per unknown port (the first 64 ports seen).
    pub unknown_ports: BTreeMap<String, u64>,
}

impl ExitCounters {
    pub fn stats(&self) -> ExitStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitStats {
            io_in: l(&self.io_in),
            io_out: l(&self.io_out),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            yields: l(&self.yields),
            unknown_port: l(&self.unknown_port),
            unknown_mmio: l(&self.unknown_mmio),
            interrupted: l(&self.interrupted),
            other: l(&self.other),
            unknown_ports: self
                .ports
                .lock()
                .map(|m| m.iter().map(|(p, n)| (format!("{p:#x}"), *n)).collect())
                .unwrap_or_default(),
        }
    }

    fn unknown(&self, vm: &str, port: u16, write: bool) {
        self.unknown_port.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.ports.lock() {
            let first = !m.contains_key(&port);
            if first && m.len() >= MAX_TRACKED_PORTS {
                return;
            }
            *m.entry(port).or_insert(0) += 1;
            if first {
                tracing::debug!(
                    vm,
                    port = format_args!("{port:#x}"),
                    write,
                    "guest touched an unemulated port (further accesses only counted)"
                );
            }
        }
    }
}

/// Device state that travels with the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegs,
    /// The last bytes of console output, so the console's history follows the guest.
    pub console_tail: Vec<u8>,
    /// virtio-mmio devices (state version 3 on).
    pub virtio: VirtioState,
}

/// Version 2 of [`DeviceState`] (no virtio devices), still read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStateV2 {
    pub serial: SerialRegs,
    pub console_tail: Vec<u8>,
}

impl From<DeviceStateV2> for DeviceState {
    fn from(v: DeviceStateV2) -> Self {
        DeviceState {
            serial: v.serial,
            console_tail: v.console_tail,
            virtio: VirtioState::default(),
        }
    }
}

/// What a port access asks of the vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    Done,
    /// The guest yields for this many TSC cycles.
    Yield(u32),
}

/// The devices of one VM.
#[derive(Debug)]
pub struct Devices {
    pub vm_name: String,
    serial: Mutex<SerialRegs>,
    pub console: Mutex<Console>,
    pub counters: ExitCounters,
    /// Port the workload guest yields on (None for other kinds).
    pub yield_port: Option<u16>,
    /// virtio-mmio devices (NICs and disks of a kind that drives them).
    pub virtio: VirtioDevices,
    /// Wakes yielding vCPUs when a device has work for the guest.
    pub waker: Arc<Waker>,
}

impl Devices {
    pub fn new(vm_name: &str, yield_port: Option<u16>) -> Self {
        Devices {
            vm_name: vm_name.to_string(),
            serial: Mutex::new(SerialRegs::default()),
            console: Mutex::new(Console::default()),
            counters: ExitCounters::default(),
            yield_port,
            virtio: VirtioDevices::default(),
            waker: Arc::new(Waker::default()),
        }
    }

    /// Devices with virtio NICs and disks (built by the caller with this `waker`).
    pub fn with_virtio(
        vm_name: &str,
        yield_port: Option<u16>,
        virtio: VirtioDevices,
        waker: Arc<Waker>,
    ) -> Self {
        Devices {
            virtio,
            waker,
            ..Self::new(vm_name, yield_port)
        }
    }

    pub fn state(&self) -> DeviceState {
        let serial = self.serial.lock().map(|s| *s).unwrap_or_default();
        let console_tail = self
            .console
            .lock()
            .map(|c| {
                let from = c.end().saturating_sub(CONSOLE_STATE_TAIL as u64);
                c.read_from(from, CONSOLE_STATE_TAIL).1
            })
            .unwrap_or_default();
        DeviceState {
            serial,
            console_tail,
            virtio: self.virtio.state(),
        }
    }

    pub fn restore(&self, st: &DeviceState) -> Result<(), VirtioError> {
        self.virtio.restore(&st.virtio)?;
        if let Ok(mut s) = self.serial.lock() {
            *s = st.serial;
        }
        if let Ok(mut c) = self.console.lock() {
            for &b in &st.console_tail {
                c.push(b);
            }
        }
        Ok(())
    }

    /// `out` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PortAction {
        self.counters.io_out.fetch_add(1, Ordering::Relaxed);
        if Some(port) == self.yield_port {
            self.counters.yields.fetch_add(1, Ordering::Relaxed);
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            return PortAction::Yield(u32::from_le_bytes(v));
        }
        if (COM1_BASE..COM1_BASE + 8).contains(&port) {
            let val = data.first().copied().unwrap_or(0);
            self.serial_write(port - COM1_BASE, val);
            return PortAction::Done;
        }
        self.counters.unknown(&self.vm_name, port, true);
        PortAction::Done
    }

    /// `in` from `port`: fills `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        self.counters.io_in.fetch_add(1, Ordering::Relaxed);
        if (COM1_BASE..COM1_BASE + 8).contains(&port) {
            let v = self.serial_read(port - COM1_BASE);
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = v;
            }
            return;
        }
        self.counters.unknown(&self.vm_name, port, false);
        data.fill(0xff);
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.counters.mmio_read.fetch_add(1, Ordering::Relaxed);
        if self.virtio.mmio_read(addr, data) {
            return;
        }
        self.counters.unknown_mmio.fetch_add(1, Ordering::Relaxed);
        data.fill(0xff);
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.counters.mmio_write.fetch_add(1, Ordering::Relaxed);
        if self.virtio.mmio_write(addr, data) {
            return;
        }
        self.counters.unknown_mmio.fetch_add(1, Ordering::Relaxed);
    }

    fn serial_write(&self, reg: u16, val: u8) {
        let Ok(mut s) = self.serial.lock() else {
            return;
        };
        let dlab = s.lcr & LCR_DLAB != 0;
        match reg {
            0 if dlab => s.dll = val,
            0 => {
                drop(s);
                if let Ok(mut c) = self.console.lock() {
                    c.push(val);
                }
            }
            1 if dlab => s.dlm = val,
            1 => s.ier = val & 0x0f,
            2 => s.fcr = val,
            3 => s.lcr = val,
            4 => s.mcr = val & 0x1f,
            7 => s.scr = val,
            _ => {}
        }
    }

    fn serial_read(&self, reg: u16) -> u8 {
        let Ok(s) = self.serial.lock() else {
            return 0xff;
        };
        let dlab = s.lcr & LCR_DLAB != 0;
        match reg {
            0 if dlab => s.dll,
            0 => 0, // no input
            1 if dlab => s.dlm,
            1 => s.ier,
            2 => IIR_NO_INT | if s.fcr & 1 != 0 { 0xc0 } else { 0 },
            3 => s.lcr,
            4 => s.mcr,
            5 => LSR_THR_EMPTY | LSR_TX_IDLE,
            6 => MSR_DCD_DSR_CTS,
            7 => s.scr,
            _ => 0xff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_prints_to_console_and_keeps_registers() {
        let d = Devices::new("t", None);
        for b in b"hi\n" {
            assert_eq!(d.io_out(COM1_BASE, &[*b]), PortAction::Done);
        }
        let mut lsr = [0u8];
        d.io_in(COM1_BASE + 5, &mut lsr);
        assert_eq!(lsr[0] & LSR_THR_EMPTY, LSR_THR_EMPTY);
        d.io_out(COM1_BASE + 3, &[0x80]);
        d.io_out(COM1_BASE, &[0x0c]); // divisor, not output
        d.io_out(COM1_BASE + 3, &[0x03]);
        let c = d.console.lock().unwrap();
        assert_eq!(c.read_from(0, 100).1, b"hi\n");
        drop(c);
        let st = d.state();
        assert_eq!(st.serial.dll, 0x0c);
        assert_eq!(st.serial.lcr, 0x03);
        let e = Devices::new("u", None);
        e.restore(&st).unwrap();
        assert_eq!(e.state(), st);
    }

    #[test]
    fn unknown_ports_read_ones_and_are_counted() {
        let d = Devices::new("t", Some(0xf0));
        let mut v = [0u8; 2];
        d.io_in(0x80, &mut v);
        assert_eq!(v, [0xff, 0xff]);
        d.io_out(0x80, &[1]);
        assert_eq!(d.io_out(0xf0, &[1, 0, 0, 0]), PortAction::Yield(1));
        let s = d.counters.stats();
        assert_eq!(s.unknown_port, 2);
        assert_eq!(s.unknown_ports.get("0x80"), Some(&2));
        assert_eq!(s.yields, 1);
    }

    #[test]
    fn console_is_bounded_with_absolute_offsets() {
        let mut c = Console::default();
        for i in 0..(CONSOLE_CAPACITY + 10) {
            c.push(i as u8);
        }
        assert_eq!(c.end(), CONSOLE_CAPACITY as u64 + 10);
        let (from, bytes) = c.read_from(0, 4);
        assert_eq!(from, 10);
        assert_eq!(bytes, vec![10, 11, 12, 13]);
    }
}
