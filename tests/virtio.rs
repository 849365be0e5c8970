//! virtio devices with real parts: KVM guest memory and its dirty log, a tap on the lab's
//! `vmbr0`, a disk image on the shared datastore, and a CPL3 guest that drives the NIC through
//! MMIO.
//!
//! Until the service guest program (`guest/`) exists, the `service` VMs here run a small probe
//! program assembled below (given with `--program`): it checks both virtio-mmio windows, brings
//! the NIC up with eight receive buffers and prints `R` and the frame's sequence character for
//! every test frame it receives (`X` for other frames), re-posting the buffer.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry::vm::virtio::{DeviceEnv, MMIO_BASE, MMIO_STRIDE};
use ferry::vm::{DiskSpec, GuestKind, NicSpec, ServiceParams, Vm, VmSpec};
use ferry_tests::{hypervisor, in_netns, require, wait_for, LabFerry, Need};
use xtask::lab::{Lab, LabOptions};

const DESC: u64 = 0x0100_0000;
const AVAIL: u64 = 0x0100_1000;
const USED: u64 = 0x0100_2000;
const BUFS: u64 = 0x0101_0000;
/// Transmit queue: descriptors, avail at +0x1000, used at +0x2000, the frame at +0x3000.
const TX: u64 = 0x0100_4000;

/// The probe guest (entered at 0x400000 with rdi = BootInfo).
fn probe_program() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut bad = a.create_label();
    let mut fill = a.create_label();
    let mut poll = a.create_label();
    let mut idle = a.create_label();
    let mut hang = a.create_label();
    let print = |a: &mut CodeAssembler, s: &str| {
        a.mov(dx, 0x3f8u32).unwrap();
        for b in s.bytes() {
            a.mov(al, u32::from(b)).unwrap();
            a.out(dx, al).unwrap();
        }
    };
    a.mov(r15, qword_ptr(rdi + 56)).unwrap(); // net_mmio
    a.mov(r14, qword_ptr(rdi + 64)).unwrap(); // blk_mmio
    a.cmp(dword_ptr(r15), 0x7472_6976).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(r14), 0x7472_6976).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(r15 + 8), 1).unwrap(); // device id: net
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(r14 + 8), 2).unwrap(); // device id: blk
    a.jne(bad).unwrap();
    print(&mut a, "MMIO OK\n");
    // Bring the NIC up: reset, ACK, DRIVER, features VERSION_1 | MAC, FEATURES_OK.
    for (off, v) in [
        (0x70, 0u32),
        (0x70, 1),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1),
        (0x24, 0),
        (0x20, 0x20),
        (0x70, 0xb),
    ] {
        a.mov(dword_ptr(r15 + off), v).unwrap();
    }
    a.mov(eax, dword_ptr(r15 + 0x70)).unwrap();
    a.test(eax, 8).unwrap();
    a.jz(bad).unwrap();
    // Receive queue 0: 8 entries.
    for (off, v) in [
        (0x30, 0u32),
        (0x38, 8),
        (0x80, DESC as u32),
        (0x84, 0),
        (0x90, AVAIL as u32),
        (0x94, 0),
        (0xa0, USED as u32),
        (0xa4, 0),
    ] {
        a.mov(dword_ptr(r15 + off), v).unwrap();
    }
    // Transmit queue 1: 8 entries, one descriptor (the echo frame) posted again and again.
    for (off, v) in [
        (0x30, 1u32),
        (0x38, 8),
        (0x80, TX as u32),
        (0x84, 0),
        (0x90, (TX + 0x1000) as u32),
        (0x94, 0),
        (0xa0, (TX + 0x2000) as u32),
        (0xa4, 0),
        (0x44, 1),
        (0x30, 0),
    ] {
        a.mov(dword_ptr(r15 + off), v).unwrap();
    }
    a.mov(rbp, TX).unwrap();
    a.mov(rax, TX + 0x3000).unwrap();
    a.mov(qword_ptr(rbp), rax).unwrap();
    a.mov(dword_ptr(rbp + 8), 12 + 60).unwrap();
    // The echo: broadcast, from the guest's MAC (BootInfo + 44), ethertype 0x88b6.
    a.mov(dword_ptr(rbp + 0x3000 + 12), 0xffff_ffffu32).unwrap();
    a.mov(word_ptr(rbp + 0x3000 + 16), 0xffffu32).unwrap();
    a.mov(eax, dword_ptr(rdi + 44)).unwrap();
    a.mov(dword_ptr(rbp + 0x3000 + 18), eax).unwrap();
    a.mov(ax, word_ptr(rdi + 48)).unwrap();
    a.mov(word_ptr(rbp + 0x3000 + 22), ax).unwrap();
    a.mov(word_ptr(rbp + 0x3000 + 24), 0xb688u32).unwrap();
    a.mov(r12, DESC).unwrap();
    a.mov(r13, AVAIL).unwrap();
    a.mov(r11, USED).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut fill).unwrap();
    a.mov(rax, rcx).unwrap();
    a.shl(rax, 11).unwrap();
    a.mov(r10, BUFS).unwrap();
    a.add(rax, r10).unwrap();
    a.mov(rbx, rcx).unwrap();
    a.shl(rbx, 4).unwrap();
    a.mov(qword_ptr(r12 + rbx), rax).unwrap();
    a.mov(dword_ptr(r12 + rbx + 8), 0x800).unwrap();
    a.mov(word_ptr(r12 + rbx + 12), 2).unwrap(); // device-writable
    a.mov(word_ptr(r12 + rbx + 14), 0).unwrap();
    a.mov(word_ptr(r13 + rcx * 2 + 4), cx).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, 8).unwrap();
    a.jb(fill).unwrap();
    a.mov(word_ptr(r13), 0).unwrap();
    a.mov(word_ptr(r13 + 2), 8).unwrap();
    a.mov(dword_ptr(r15 + 0x44), 1).unwrap(); // QueueReady
    a.mov(dword_ptr(r15 + 0x70), 0xf).unwrap(); // DRIVER_OK
    a.mov(dword_ptr(r15 + 0x50), 0).unwrap(); // notify RX
    print(&mut a, "NET UP\n");
    a.xor(esi, esi).unwrap();
    a.set_label(&mut poll).unwrap();
    a.movzx(eax, word_ptr(r11 + 2)).unwrap();
    a.cmp(ax, si).unwrap();
    a.je(idle).unwrap();
    // One used entry: note the frame's ethertype and sequence byte, give its buffer back
    // (avail.ring[avail.idx % 8] = id), notify; print `R<seq>` for a test frame (ethertype
    // 0x88b5), `X` for anything else.
    let mut other = a.create_label();
    a.mov(ebx, esi).unwrap();
    a.and(ebx, 7).unwrap();
    a.mov(eax, dword_ptr(r11 + rbx * 8 + 4)).unwrap();
    a.mov(r10d, eax).unwrap();
    a.shl(r10, 11).unwrap();
    a.mov(rcx, BUFS).unwrap();
    a.add(r10, rcx).unwrap();
    a.movzx(edi, word_ptr(r10 + 24)).unwrap();
    a.movzx(r12d, byte_ptr(r10 + 26)).unwrap();
    a.movzx(r8d, word_ptr(r13 + 2)).unwrap();
    a.mov(r9d, r8d).unwrap();
    a.and(r9d, 7).unwrap();
    a.mov(word_ptr(r13 + r9 * 2 + 4), ax).unwrap();
    a.inc(r8d).unwrap();
    a.mov(word_ptr(r13 + 2), r8w).unwrap();
    a.mov(dword_ptr(r15 + 0x50), 0).unwrap();
    a.inc(esi).unwrap();
    a.cmp(edi, 0xb588).unwrap();
    a.jne(other).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, u32::from(b'R')).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, r12b).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, 10u32).unwrap();
    a.out(dx, al).unwrap();
    // Echo it: the sequence byte into the frame, the descriptor into the TX avail ring, notify.
    a.mov(byte_ptr(rbp + 0x3000 + 26), r12b).unwrap();
    a.movzx(r8d, word_ptr(rbp + 0x1000 + 2)).unwrap();
    a.mov(r9d, r8d).unwrap();
    a.and(r9d, 7).unwrap();
    a.mov(word_ptr(rbp + r9 * 2 + 0x1000 + 4), 0).unwrap();
    a.inc(r8d).unwrap();
    a.mov(word_ptr(rbp + 0x1000 + 2), r8w).unwrap();
    a.mov(dword_ptr(r15 + 0x50), 1).unwrap();
    // Take ~100 ms per frame (a spin: a yield would end early at the next delivery), so a
    // burst keeps frames queued in the device for seconds.
    let mut spin = a.create_label();
    a.mov(ecx, 200_000_000u32).unwrap();
    a.set_label(&mut spin).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(spin).unwrap();
    a.jmp(poll).unwrap();
    a.set_label(&mut other).unwrap();
    print(&mut a, "X\n");
    a.jmp(poll).unwrap();
    a.set_label(&mut idle).unwrap();
    a.mov(eax, 2_000_000u32).unwrap();
    a.mov(dx, 0xf0u32).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(poll).unwrap();
    a.set_label(&mut bad).unwrap();
    print(&mut a, "BAD\n");
    a.set_label(&mut hang).unwrap();
    a.mov(eax, 100_000_000u32).unwrap();
    a.mov(dx, 0xf0u32).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(hang).unwrap();
    a.assemble(0x40_0000).unwrap()
}

/// Queue, request buffers of the journal probe: descriptors, avail +0x1000, used +0x2000,
/// header +0x4000, data +0x5000, status +0x6000.
const JBASE: u64 = 0x0100_8000;
/// Records the journal probe writes before it stops (well inside a 16 MiB disk).
const JOURNAL_MAX: u32 = 20_000;

/// The journal probe: record `n` (its number in the first 8 bytes, then "FJ") goes to sector
/// `n` with a virtio-blk OUT, then a FLUSH; after every 16th flushed record it prints the count
/// of durable records as 8 hex digits. Any request that fails prints `BAD`.
fn journal_program() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut bad = a.create_label();
    let mut record = a.create_label();
    let mut hang = a.create_label();
    let mut no_print = a.create_label();
    a.mov(r14, qword_ptr(rdi + 64)).unwrap(); // blk_mmio
    a.cmp(dword_ptr(r14 + 8), 2).unwrap();
    a.jne(bad).unwrap();
    for (off, v) in [
        (0x70, 0u32),
        (0x70, 1),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1),
        (0x24, 0),
        (0x20, 1 << 9),
        (0x70, 0xb),
    ] {
        a.mov(dword_ptr(r14 + off), v).unwrap();
    }
    a.mov(eax, dword_ptr(r14 + 0x70)).unwrap();
    a.test(eax, 8).unwrap();
    a.jz(bad).unwrap();
    for (off, v) in [
        (0x30, 0u32),
        (0x38, 4),
        (0x80, JBASE as u32),
        (0x84, 0),
        (0x90, (JBASE + 0x1000) as u32),
        (0x94, 0),
        (0xa0, (JBASE + 0x2000) as u32),
        (0xa4, 0),
        (0x44, 1),
        (0x70, 0xf),
    ] {
        a.mov(dword_ptr(r14 + off), v).unwrap();
    }
    a.mov(rbp, JBASE).unwrap();
    // d0: header -> d1: data -> d2: status (an OUT); d3: header -> d2 (a FLUSH).
    for (i, addr, len, flags, next) in [
        (0u64, JBASE + 0x4000, 16u32, 1u32, 1u32),
        (1, JBASE + 0x5000, 512, 1, 2),
        (2, JBASE + 0x6000, 1, 2, 0),
        (3, JBASE + 0x4000, 16, 1, 2),
    ] {
        a.mov(rax, addr).unwrap();
        a.mov(qword_ptr(rbp + 16 * i), rax).unwrap();
        a.mov(dword_ptr(rbp + 16 * i + 8), len).unwrap();
        a.mov(word_ptr(rbp + 16 * i + 12), flags).unwrap();
        a.mov(word_ptr(rbp + 16 * i + 14), next).unwrap();
    }
    a.mov(
        word_ptr(rbp + 0x5000 + 8),
        u32::from(u16::from_le_bytes(*b"FJ")),
    )
    .unwrap();
    a.xor(esi, esi).unwrap(); // record number
    a.xor(r8d, r8d).unwrap(); // requests made = used idx expected
                              // One request with head `h` (in ecx): post, notify, wait for it, check the status.
    let request = |a: &mut CodeAssembler, head: u32, bad: CodeLabel| {
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.mov(byte_ptr(rbp + 0x6000), 0xffu32).unwrap();
        a.mov(r9d, r8d).unwrap();
        a.and(r9d, 3).unwrap();
        a.mov(word_ptr(rbp + r9 * 2 + 0x1000 + 4), head).unwrap();
        a.inc(r8d).unwrap();
        a.mov(word_ptr(rbp + 0x1000 + 2), r8w).unwrap();
        a.mov(dword_ptr(r14 + 0x50), 0).unwrap();
        a.set_label(&mut wait).unwrap();
        a.movzx(eax, word_ptr(rbp + 0x2000 + 2)).unwrap();
        a.cmp(ax, r8w).unwrap();
        a.je(done).unwrap();
        a.mov(eax, 1_000_000u32).unwrap();
        a.mov(dx, 0xf0u32).unwrap();
        a.out(dx, eax).unwrap();
        a.jmp(wait).unwrap();
        a.set_label(&mut done).unwrap();
        a.cmp(byte_ptr(rbp + 0x6000), 0).unwrap();
        a.jne(bad).unwrap();
    };
    a.set_label(&mut record).unwrap();
    a.cmp(esi, JOURNAL_MAX).unwrap();
    a.jae(hang).unwrap();
    a.mov(dword_ptr(rbp + 0x4000), 1).unwrap(); // OUT
    a.mov(qword_ptr(rbp + 0x4000 + 8), rsi).unwrap(); // sector n
    a.mov(qword_ptr(rbp + 0x5000), rsi).unwrap(); // record n
    request(&mut a, 0, bad);
    a.mov(dword_ptr(rbp + 0x4000), 4).unwrap(); // FLUSH
    a.mov(qword_ptr(rbp + 0x4000 + 8), 0).unwrap();
    request(&mut a, 3, bad);
    a.inc(esi).unwrap();
    a.test(esi, 15).unwrap();
    a.jnz(no_print).unwrap();
    // Print esi as 8 hex digits.
    let mut digit = a.create_label();
    let mut dec = a.create_label();
    a.mov(edi, 8).unwrap();
    a.mov(ebx, esi).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.set_label(&mut digit).unwrap();
    a.rol(ebx, 4).unwrap();
    a.mov(eax, ebx).unwrap();
    a.and(eax, 0xf).unwrap();
    a.cmp(eax, 10).unwrap();
    a.jb(dec).unwrap();
    a.add(eax, 39).unwrap();
    a.set_label(&mut dec).unwrap();
    a.add(eax, 48).unwrap();
    a.out(dx, al).unwrap();
    a.dec(edi).unwrap();
    a.jnz(digit).unwrap();
    a.mov(al, 10u32).unwrap();
    a.out(dx, al).unwrap();
    a.set_label(&mut no_print).unwrap();
    a.jmp(record).unwrap();
    a.set_label(&mut bad).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    for b in b"BAD\n" {
        a.mov(al, u32::from(*b)).unwrap();
        a.out(dx, al).unwrap();
    }
    a.set_label(&mut hang).unwrap();
    a.mov(eax, 100_000_000u32).unwrap();
    a.mov(dx, 0xf0u32).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(hang).unwrap();
    a.assemble(0x40_0000).unwrap()
}

/// Durable-record counts the journal probe printed, in order.
fn journal_marks(text: &str) -> Vec<u32> {
    text.lines()
        .filter(|l| l.len() == 8)
        .filter_map(|l| u32::from_str_radix(l, 16).ok())
        .collect()
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("ferry-virtio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn service_spec(name: &str, program: &Path, nic: bool) -> VmSpec {
    let mut p = ServiceParams::new("198.18.2.10".parse().unwrap(), 24);
    p.program = Some(program.to_path_buf());
    VmSpec {
        name: name.into(),
        memory_mib: 128,
        vcpus: 1,
        kind: GuestKind::Service(p),
        disks: vec![DiskSpec {
            path: "[shared] t/disk.img".into(),
            size_mib: 1,
        }],
        nics: if nic {
            vec![NicSpec {
                mac: "52:54:00:0a:0b:0c".into(),
                port_group: "vm-net".into(),
            }]
        } else {
            vec![]
        },
        cpu: Default::default(),
    }
}

/// A virtio-blk read writes data, status byte and used ring into real guest memory, a
/// virtio-net receive a frame and its used ring: all those pages are in the next `take_dirty`,
/// though KVM's dirty log never saw them written.
#[test]
fn device_writes_are_dirty_in_kvm_guest_memory() {
    let Some(hv) = hypervisor("device_writes_are_dirty_in_kvm_guest_memory") else {
        return;
    };
    let dir = TempDir::new("blk");
    let program = dir.0.join("probe.bin");
    std::fs::write(&program, probe_program()).unwrap();
    let disk = dir.0.join("disk.img");
    let mut img = vec![0u8; 1 << 20];
    img[512..1024].fill(0x5a);
    std::fs::write(&disk, &img).unwrap();
    let env = DeviceEnv {
        bridges: vec![None],
        disks: vec![Some(disk.clone())],
    };
    let vm = Vm::create_in(&hv, service_spec("devdirty", &program, true), &env).unwrap();
    let mem = vm.memory().clone();
    let dev = vm.devices().clone();
    let blk = MMIO_BASE + MMIO_STRIDE;
    let w = |off: u64, v: u32| dev.mmio_write(blk + off, &v.to_le_bytes());
    let r = |off: u64| {
        let mut b = [0u8; 4];
        dev.mmio_read(blk + off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(r(0), 0x7472_6976);
    assert_eq!(r(8), 2);
    let mut cap = [0u8; 8];
    dev.mmio_read(blk + 0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    // Driver side: queue of 4 at DESC/AVAIL/USED, one IN request for sector 1.
    for (off, v) in [
        (0x70, 0),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1),
        (0x24, 0),
        (0x20, 1 << 9),
        (0x70, 0xb),
        (0x30, 0),
        (0x38, 4),
        (0x80, DESC as u32),
        (0x90, AVAIL as u32),
        (0xa0, USED as u32),
        (0x44, 1),
        (0x70, 0xf),
    ] {
        w(off, v);
    }
    assert_eq!(r(0x70), 0xf, "driver OK");
    let hdr = 0x0180_0000u64;
    let data = 0x0181_0000u64;
    let status = 0x0182_0000u64;
    let mut h = [0u8; 16];
    h[8..].copy_from_slice(&1u64.to_le_bytes());
    mem.write(hdr, &h).unwrap();
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write(DESC + 16 * i, &d).unwrap();
    };
    desc(0, hdr, 16, 1, 1);
    desc(1, data, 512, 3, 2);
    desc(2, status, 1, 2, 0);
    mem.write(AVAIL + 4, &0u16.to_le_bytes()).unwrap();
    mem.write(AVAIL + 2, &1u16.to_le_bytes()).unwrap();
    mem.set_dirty_logging_all(true).unwrap();
    let clean = mem.take_dirty().unwrap();
    for p in [data, status, USED] {
        assert!(!clean.contains(p), "{p:#x} dirty before the request");
    }
    dev.virtio.activate();
    w(0x50, 0);
    wait_for("the request to complete", 10, || {
        ((mem.read_u64(USED).ok()? >> 16) & 0xffff == 1).then_some(())
    });
    let mut got = vec![0u8; 512];
    mem.read(data, &mut got).unwrap();
    assert_eq!(got, vec![0x5a; 512]);
    let mut st = [0xffu8];
    mem.read(status, &mut st).unwrap();
    assert_eq!(st[0], 0, "status OK");
    let dirty = mem.take_dirty().unwrap();
    for (p, what) in [
        (data, "read data"),
        (status, "status byte"),
        (USED, "used ring"),
    ] {
        assert!(dirty.contains(p), "{what} page {p:#x} is not dirty");
    }
    assert!(!dirty.contains(hdr), "the device does not write the header");
    // The pause drains and the state carries the queue position.
    assert_eq!(vm.last_quiesced().io_drained, 0);
    let q = dev.virtio.quiesce();
    assert_eq!(q.io_drained, 0);
    let st = dev.virtio.state();
    assert_eq!(st.blk[0].transport.queues[0].next_used, 1);

    // virtio-net: a received frame lands in a posted buffer; buffer and used ring are dirty.
    let net = MMIO_BASE;
    let wn = |off: u64, v: u32| dev.mmio_write(net + off, &v.to_le_bytes());
    let (rdesc, ravail, rused, rbuf) = (
        0x0190_0000u64,
        0x0190_1000u64,
        0x0190_2000u64,
        0x0191_0000u64,
    );
    for (off, v) in [
        (0x70, 0),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1),
        (0x24, 0),
        (0x20, 1 << 5),
        (0x70, 0xb),
        (0x30, 0),
        (0x38, 4),
        (0x80, rdesc as u32),
        (0x90, ravail as u32),
        (0xa0, rused as u32),
        (0x44, 1),
        (0x70, 0xf),
    ] {
        wn(off, v);
    }
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&rbuf.to_le_bytes());
    d[8..12].copy_from_slice(&2048u32.to_le_bytes());
    d[12..14].copy_from_slice(&2u16.to_le_bytes());
    mem.write(rdesc, &d).unwrap();
    mem.write(ravail + 4, &0u16.to_le_bytes()).unwrap();
    mem.write(ravail + 2, &1u16.to_le_bytes()).unwrap();
    let clean = mem.take_dirty().unwrap();
    assert!(!clean.contains(rbuf) && !clean.contains(rused));
    // The NIC's line (slot 0, GSI 5) is not raised until a frame is delivered.
    assert_eq!(pic_master_irr(&vm) & (1 << 5), 0, "line 5 raised before RX");
    let nic = &dev.virtio.net[0];
    nic.start_delivery();
    nic.receive([vec![0x42u8; 100]]);
    wait_for("the frame to be delivered", 10, || {
        ((mem.read_u64(rused).ok()? >> 16) & 0xffff == 1).then_some(())
    });
    let mut got = vec![0u8; 100];
    mem.read(rbuf + 12, &mut got).unwrap();
    assert_eq!(got, vec![0x42; 100]);
    let dirty = mem.take_dirty().unwrap();
    for (p, what) in [(rbuf, "RX buffer"), (rused, "RX used ring")] {
        assert!(dirty.contains(p), "{what} page {p:#x} is not dirty");
    }
    assert_eq!(nic.irq().raised(), 1);
    wait_for("IRR bit 5 of the PIC master after RX", 5, || {
        (pic_master_irr(&vm) & (1 << 5) != 0).then_some(())
    });
    vm.stop();
}

/// Send `n` broadcast frames (ethertype 0x88b5) out of interface `iface` in namespace `netns`,
/// numbered from `first`: payload byte 0 is `seq_char(seq)`.
fn send_broadcasts(netns: &str, iface: &'static str, first: usize, n: usize) {
    in_netns(netns, move || {
        // SAFETY: plain socket(2); checked below and closed at the end.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {iface}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = index as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5]);
        frame.resize(64, 0x11);
        for seq in first..first + n {
            frame[14] = seq_char(seq);
            // SAFETY: sendto(2) of a buffer we own to a sockaddr_ll of the right size.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                rc,
                frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: closing the socket we opened.
        unsafe { libc::close(fd) };
    });
}

/// A packet socket in namespace `netns` receiving frames of `ethertype` on `iface`.
fn listen(netns: &str, iface: &'static str, ethertype: u16) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    in_netns(netns, move || {
        let proto = ethertype.to_be();
        // SAFETY: plain socket(2); checked below and owned by the returned OwnedFd.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {iface}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        // SAFETY: bind(2) with a sockaddr_ll of the right size.
        let rc = unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    })
}

/// Frames waiting on a packet socket: (source MAC, sequence byte), without blocking.
fn drain_frames(fd: &std::os::fd::OwnedFd) -> Vec<([u8; 6], u8)> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: recv(2) into a buffer we own, non-blocking.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 15 {
            return out;
        }
        out.push((buf[6..12].try_into().unwrap(), buf[14]));
    }
}

fn console(f: &LabFerry<'_>, host: &str, vm: &str) -> String {
    let o = f.cli(host, &["vm", "console", vm]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The character the probe prints for frame `seq`.
fn seq_char(seq: usize) -> u8 {
    b'0' + (seq % 64) as u8
}

/// Sequence characters of the test frames the guest received, in order.
fn received_seq(text: &str) -> Vec<u8> {
    text.lines()
        .filter_map(|l| l.strip_prefix('R'))
        .filter(|r| r.len() == 1)
        .map(|r| r.as_bytes()[0])
        .collect()
}

fn received(text: &str) -> usize {
    received_seq(text).len()
}

/// `ip -j -d link show DEV` in a lab host: (master, MAC), or None if there is no such device.
fn link(lab: &Lab, host: &str, dev: &str) -> Option<(String, String)> {
    let out = lab.exec(host, &["ip", "-j", "link", "show", dev]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let l = &v[0];
    Some((
        l["master"].as_str().unwrap_or_default().to_string(),
        l["address"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Whether host `host` of the lab has `path` open: its agent, or (`[vmm] mode = "process"`) one
/// of its VMMs (`ferry vmm ... --state-dir HOST_STATE_DIR`).
fn host_has_open(lab: &Lab, host: &str, path: &Path) -> bool {
    let h = lab.host(host).unwrap();
    let state_dir = h.state_dir.to_string_lossy().into_owned();
    let vmms = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                        args.contains(&&b"vmm"[..]) && args.contains(&state_dir.as_bytes())
                    })
                })
                .collect::<Vec<u32>>()
        })
        .unwrap_or_default();
    h.agent_pid
        .into_iter()
        .chain(vmms)
        .any(|pid| has_open(pid, path))
}

fn has_open(pid: u32, path: &Path) -> bool {
    let want = std::fs::canonicalize(path).unwrap_or(path.to_path_buf());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == want))
        })
        .unwrap_or(false)
}

/// A service VM with a NIC and a disk on host a: its tap is on vmbr0 with the MAC, its image is
/// open, frames broadcast on the bridge reach the guest's buffers; after a move to b the tap and
/// the image are on b (and gone from a), and frames sent on b reach the guest there.
#[test]
fn service_vm_nic_and_disk_in_the_lab_and_across_a_migration() {
    if !require(
        "service_vm_nic_and_disk_in_the_lab_and_across_a_migration",
        &[Need::Root, Need::Kvm, Need::Netns],
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::for_test("virtio").with_ferry_bin(ferry_tests::ferry_bin()))
        .expect("lab up");
    let f = LabFerry { lab: &lab };
    let program = lab.root().join("probe.bin");
    std::fs::write(&program, probe_program()).unwrap();
    let program_s = program.to_str().unwrap();
    f.json(
        "a",
        &[
            "vm",
            "create",
            "s1",
            "--kind",
            "service",
            "--memory",
            "128M",
            "--ip",
            "198.18.2.10/24",
            "--nic",
            "52:54:00:0a:0b:0c@vm-net",
            "--disk",
            "[shared] s1/disk.img:16M",
            "--program",
            program_s,
            "--start",
        ],
    );
    let info = f.json("a", &["vm", "inspect", "s1"]);
    let tap = info["nics"][0]["tap"]
        .as_str()
        .unwrap_or_else(|| panic!("no tap in {info}"))
        .to_string();
    let (master, mac) = link(&lab, "a", &tap).expect("the tap exists on host a");
    assert_eq!(master, "vmbr0");
    assert_eq!(mac, "fe:54:00:0a:0b:0c");
    let image = lab.shared_datastore().join("s1/disk.img");
    assert!(
        host_has_open(&lab, "a", &image),
        "agent a (or its VMM) has the disk image open"
    );
    wait_for("the probe guest to bring its NIC up", 20, || {
        let c = console(&f, "a", "s1");
        assert!(!c.contains("BAD"), "probe guest failed: {c}");
        c.contains("NET UP").then_some(())
    });
    // The guest echoes every test frame (ethertype 0x88b6, from its MAC): all of them pass the
    // switch, whichever host the guest is on.
    let echoes = listen(lab.switch_netns(), xtask::lab::SWITCH_BRIDGE, 0x88b6);
    let mut echoed = Vec::new();
    let netns_a = lab.host("a").unwrap().netns.clone();
    send_broadcasts(&netns_a, "vmbr0", 0, 5);
    wait_for("5 frames at the guest on a", 10, || {
        (received(&console(&f, "a", "s1")) >= 5).then_some(())
    });
    let t = Instant::now();
    let rec = f.migrate("a", "s1", "b", &["--verify"]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    let dev = &rec["summary"]["devices"];
    assert!(
        dev["state_bytes"].as_u64().unwrap_or(0) > 0,
        "device state in {rec}"
    );
    eprintln!("migration took {:?}; devices {dev}", t.elapsed());
    // The tap moved: on b's bridge, gone from a; the image is open on b only.
    let (master, mac) = link(&lab, "b", &tap).expect("the tap exists on host b");
    assert_eq!(
        (master.as_str(), mac.as_str()),
        ("vmbr0", "fe:54:00:0a:0b:0c")
    );
    wait_for("a's tap to go", 10, || {
        link(&lab, "a", &tap).is_none().then_some(())
    });
    assert!(
        host_has_open(&lab, "b", &image),
        "agent b (or its VMM) has the disk image open"
    );
    wait_for("host a to close the disk image", 10, || {
        (!host_has_open(&lab, "a", &image)).then_some(())
    });
    // The guest on b receives what is sent on b's bridge.
    let before = received(&console(&f, "b", "s1"));
    assert!(before >= 5, "the console history came along");
    let netns_b = lab.host("b").unwrap().netns.clone();
    send_broadcasts(&netns_b, "vmbr0", 5, 3);
    wait_for("3 more frames at the guest on b", 10, || {
        (received(&console(&f, "b", "s1")) >= before + 3).then_some(())
    });
    let info = f.json("b", &["vm", "inspect", "s1"]);
    assert_eq!(info["state"], "running");
    assert_eq!(info["nics"][0]["bad_chains"], 0, "{info}");
    // A burst the guest takes seconds to consume: what is still queued in the device at the
    // pause travels with its state and is delivered on the destination; every frame exactly
    // once.
    let before = received(&console(&f, "b", "s1"));
    send_broadcasts(&netns_b, "vmbr0", 8, 40);
    wait_for("frames queued on b", 10, || {
        let i = f.json("b", &["vm", "inspect", "s1"]);
        (i["nics"][0]["rx_queued"].as_u64()? > 10).then_some(())
    });
    let rec = f.migrate("b", "s1", "a", &["--verify"]);
    assert_eq!(rec["phase"], "completed", "{rec}");
    let carried = rec["summary"]["devices"]["rx_frames_carried"]
        .as_u64()
        .unwrap_or(0);
    eprintln!("frames carried b -> a: {carried}");
    assert!(
        carried > 0,
        "frames queued at the pause were carried: {rec}"
    );
    let (master, _) = link(&lab, "a", &tap).expect("the tap is back on host a");
    assert_eq!(master, "vmbr0");
    wait_for("b's tap to go", 10, || {
        link(&lab, "b", &tap).is_none().then_some(())
    });
    wait_for("all 40 frames at the guest", 30, || {
        (received(&console(&f, "a", "s1")) >= before + 40).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let want: Vec<u8> = (0..48).map(seq_char).collect();
    assert_eq!(
        String::from_utf8_lossy(&received_seq(&console(&f, "a", "s1"))),
        String::from_utf8_lossy(&want),
        "every frame delivered exactly once, in order, across two migrations"
    );
    let i = f.json("a", &["vm", "inspect", "s1"]);
    assert_eq!(i["nics"][0]["rx_dropped"], 0, "{i}");
    // Every frame was echoed once, in order, from the guest's MAC, by whichever copy ran.
    wait_for("48 echoes at the switch", 10, || {
        echoed.extend(drain_frames(&echoes));
        (echoed.len() >= 48).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    echoed.extend(drain_frames(&echoes));
    assert!(echoed
        .iter()
        .all(|(mac, _)| *mac == [0x52, 0x54, 0, 0x0a, 0x0b, 0x0c]));
    let seqs: Vec<u8> = echoed.iter().map(|e| e.1).collect();
    assert_eq!(
        String::from_utf8_lossy(&seqs),
        String::from_utf8_lossy(&want),
        "each frame echoed (virtio-net TX through the tap) exactly once"
    );
    // Inspected again: `i` was taken before the echoes were awaited, and a's last echoes may
    // have gone out after it.
    let i = f.json("a", &["vm", "inspect", "s1"]);
    let tx_a = i["nics"][0]["tx_frames"].as_u64().unwrap_or(0);
    assert!(tx_a >= carried, "the carried frames were echoed on a: {i}");
    let o = f.cli("a", &["vm", "destroy", "s1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for("a's tap to go", 10, || {
        link(&lab, "a", &tap).is_none().then_some(())
    });
    lab.down().expect("lab down");
}

/// A guest that appends and flushes records through virtio-blk migrates a -> b -> a while it
/// writes: the count it reports goes on without a gap or a repeat, and every record it reported
/// durable is in the image on the shared datastore, in its own sector, exactly as written.
#[test]
fn blk_journal_survives_migrations() {
    if !require(
        "blk_journal_survives_migrations",
        &[Need::Root, Need::Kvm, Need::Netns],
    ) {
        return;
    }
    let lab = Lab::up(LabOptions::for_test("vjournal").with_ferry_bin(ferry_tests::ferry_bin()))
        .expect("lab up");
    let f = LabFerry { lab: &lab };
    let program = lab.root().join("journal.bin");
    std::fs::write(&program, journal_program()).unwrap();
    f.json(
        "a",
        &[
            "vm",
            "create",
            "j1",
            "--kind",
            "service",
            "--memory",
            "128M",
            "--ip",
            "198.18.2.11/24",
            "--disk",
            "[shared] j1/disk.img:16M",
            "--program",
            program.to_str().unwrap(),
            "--start",
        ],
    );
    let marks = |host: &str| {
        let c = console(&f, host, "j1");
        assert!(!c.contains("BAD"), "a block request failed: {c}");
        journal_marks(&c)
    };
    let mut drained = 0;
    for (from, to) in [("a", "b"), ("b", "a")] {
        let seen = marks(from).last().copied().unwrap_or(0);
        wait_for("the journal to advance", 20, || {
            (marks(from).last().copied().unwrap_or(0) >= seen + 64).then_some(())
        });
        let rec = f.migrate(from, "j1", to, &["--verify"]);
        assert_eq!(rec["phase"], "completed", "{rec}");
        let d = &rec["summary"]["devices"];
        eprintln!("journal {from} -> {to}: devices {d}");
        drained += d["io_drained"].as_u64().unwrap_or(0);
        let at = marks(to).last().copied().unwrap_or(0);
        wait_for("the journal to go on at the destination", 20, || {
            (marks(to).last().copied().unwrap_or(0) >= at + 64).then_some(())
        });
    }
    f.json("a", &["vm", "pause", "j1"]);
    let m = marks("a");
    // Every 16 records, no gap and no repeat across both moves.
    for (i, w) in m.windows(2).enumerate() {
        assert_eq!(w[1], w[0] + 16, "journal marks jump at line {i}: {m:?}");
    }
    let durable = *m.last().unwrap();
    assert!(durable >= 4 * 64, "{durable} records");
    let image = std::fs::read(lab.shared_datastore().join("j1/disk.img")).unwrap();
    for n in 0..durable as usize {
        let s = &image[n * 512..n * 512 + 512];
        assert_eq!(
            u64::from_le_bytes(s[..8].try_into().unwrap()),
            n as u64,
            "sector {n}"
        );
        assert_eq!(&s[8..10], b"FJ", "sector {n}");
        assert!(
            s[10..].iter().all(|&b| b == 0),
            "sector {n} holds only its record"
        );
    }
    eprintln!(
        "{durable} durable records verified in the image; {drained} requests drained at pauses"
    );
    let o = f.cli("a", &["vm", "destroy", "j1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    lab.down().expect("lab down");
}

fn vm_console(vm: &Vm) -> String {
    let c = vm.devices().console.lock().unwrap();
    String::from_utf8_lossy(&c.read_from(0, 1 << 20).1).into_owned()
}

/// `vm save` / `vm restore` carry the block device's state: a journaling guest saved mid-run
/// and restored from the files goes on at the next record, and the image holds every record.
#[test]
fn blk_state_survives_save_and_restore() {
    let Some(hv) = hypervisor("blk_state_survives_save_and_restore") else {
        return;
    };
    let dir = TempDir::new("save");
    let program = dir.0.join("journal.bin");
    std::fs::write(&program, journal_program()).unwrap();
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let env = DeviceEnv {
        bridges: vec![],
        disks: vec![Some(disk.clone())],
    };
    let vm = Vm::create_in(&hv, service_spec("jsave", &program, false), &env).unwrap();
    vm.start().unwrap();
    let marks = |vm: &Vm| {
        let c = vm_console(vm);
        assert!(!c.contains("BAD"), "a block request failed: {c}");
        journal_marks(&c)
    };
    wait_for("the journal to advance", 20, || {
        (marks(&vm).last().copied().unwrap_or(0) >= 64).then_some(())
    });
    vm.pause().unwrap();
    let at_save = marks(&vm).last().copied().unwrap();
    let save_dir = dir.0.join("saved");
    ferry::vm::snapshot::save(&vm, &save_dir).unwrap();
    let (_, state) = ferry::vm::snapshot::read(&save_dir).unwrap();
    let q = state.devices.virtio.blk[0].transport.queues[0];
    assert!(q.ready && u32::from(q.next_used) >= 2 * at_save, "{q:?}");
    vm.stop();
    drop(vm);
    let vm = ferry::vm::snapshot::restore(&hv, &save_dir, None, &env).unwrap();
    vm.resume().unwrap();
    wait_for("the journal to go on after the restore", 20, || {
        (marks(&vm).last().copied().unwrap_or(0) >= at_save + 64).then_some(())
    });
    vm.pause().unwrap();
    let m = marks(&vm);
    for w in m.windows(2) {
        assert_eq!(w[1], w[0] + 16, "journal marks jump: {m:?}");
    }
    let durable = *m.last().unwrap() as usize;
    let image = std::fs::read(&disk).unwrap();
    for n in 0..durable {
        assert_eq!(
            u64::from_le_bytes(image[n * 512..n * 512 + 8].try_into().unwrap()),
            n as u64,
            "sector {n}"
        );
    }
    vm.stop();
}

/// The destination agent is killed during the switchover (before the commit) and then at the
/// commit, while the guest journals through its disk: each time the guest resumes on the
/// source, its tap still on a's bridge and b's gone, and the journal goes on without a gap or a
/// repeat; every durable record is in the image.
#[test]
fn blk_journal_survives_a_destination_killed_at_switchover_and_commit() {
    if !require(
        "blk_journal_survives_a_destination_killed_at_switchover_and_commit",
        &[Need::Root, Need::Kvm, Need::Netns],
    ) {
        return;
    }
    let mut lab = Lab::up(LabOptions::for_test("vfault").with_ferry_bin(ferry_tests::ferry_bin()))
        .expect("lab up");
    let program = lab.root().join("journal.bin");
    std::fs::write(&program, journal_program()).unwrap();
    {
        let f = LabFerry { lab: &lab };
        f.json(
            "a",
            &[
                "vm",
                "create",
                "j2",
                "--kind",
                "service",
                "--memory",
                "128M",
                "--ip",
                "198.18.2.12/24",
                "--nic",
                "vm-net",
                "--disk",
                "[shared] j2/disk.img:16M",
                "--program",
                program.to_str().unwrap(),
                "--start",
            ],
        );
    }
    let tap = LabFerry { lab: &lab }.json("a", &["vm", "inspect", "j2"])["nics"][0]["tap"]
        .as_str()
        .unwrap()
        .to_string();
    for point in ["dest:before-prepared", "dest:commit"] {
        let f = LabFerry { lab: &lab };
        let marks = || {
            let c = console(&f, "a", "j2");
            assert!(!c.contains("BAD"), "a block request failed: {c}");
            journal_marks(&c)
        };
        let seen = marks().last().copied().unwrap_or(0);
        wait_for("the journal to advance", 20, || {
            (marks().last().copied().unwrap_or(0) >= seen + 64).then_some(())
        });
        let c = ferry::control::client::Client::new(&lab.host("b").unwrap().socket);
        let _: serde_json::Value = c
            .post(
                "/v1/debug/faults",
                &serde_json::json!({"point": point, "action": "kill"}),
            )
            .unwrap_or_else(|e| panic!("arm {point}: {e}"));
        let rec = f.migrate("a", "j2", "b", &[]);
        assert_eq!(rec["phase"], "failed", "{rec}");
        assert_eq!(rec["guest_on"], "source", "{rec}");
        let (master, _) = link(&lab, "a", &tap).expect("a's tap is still there");
        assert_eq!(master, "vmbr0");
        assert!(
            link(&lab, "b", &tap).is_none(),
            "b's tap went with its agent"
        );
        let at = marks().last().copied().unwrap_or(0);
        wait_for("the journal to go on at the source", 20, || {
            (marks().last().copied().unwrap_or(0) >= at + 64).then_some(())
        });
        eprintln!("{point}: guest resumed on a, journal at {at}");
        lab.stop_agent("b").unwrap();
        lab.start_agent("b").unwrap();
    }
    let f = LabFerry { lab: &lab };
    f.json("a", &["vm", "pause", "j2"]);
    let m = journal_marks(&console(&f, "a", "j2"));
    for w in m.windows(2) {
        assert_eq!(w[1], w[0] + 16, "journal marks jump: {m:?}");
    }
    let durable = *m.last().unwrap() as usize;
    let image = std::fs::read(lab.shared_datastore().join("j2/disk.img")).unwrap();
    for n in 0..durable {
        let s = &image[n * 512..n * 512 + 512];
        assert_eq!(
            u64::from_le_bytes(s[..8].try_into().unwrap()),
            n as u64,
            "sector {n}"
        );
    }
    let o = f.cli("a", &["vm", "destroy", "j2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    lab.down().expect("lab down");
}

/// The 8259 master's IRR (interrupt request register) as KVM_GET_IRQCHIP reports it.
fn pic_master_irr(vm: &Vm) -> u8 {
    let st = vm.capture_state().expect("capture the irqchip state");
    let c = st
        .irqchips
        .iter()
        .find(|c| c.chip_id == 0)
        .expect("the state holds the PIC master (chip 0)");
    // SAFETY: chip_id 0 (KVM_IRQCHIP_PIC_MASTER) is the union's `pic` member, plain bytes.
    unsafe { c.chip.pic }.irr
}

/// GSI of the first disk: virtio-mmio slot 1, GSI 5 + 1.
const BLK_GSI: u32 = 6;

/// Drive disk 0 of a parked VM from the test as a driver would: bring it up with a queue of 4
/// at DESC/AVAIL/USED (when `setup`), then post one read of sector 1, with the avail ring's
/// flags set to `avail_flags`, and wait for it to be used. Returns the used index.
fn blk_read_request(vm: &Vm, setup: bool, avail_flags: u16) -> u16 {
    let mem = vm.memory().clone();
    let dev = vm.devices().clone();
    let blk = MMIO_BASE + MMIO_STRIDE;
    let w = |off: u64, v: u32| dev.mmio_write(blk + off, &v.to_le_bytes());
    if setup {
        for (off, v) in [
            (0x70, 0),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x24, 0),
            (0x20, 0),
            (0x70, 0xb),
            (0x30, 0),
            (0x38, 4),
            (0x80, DESC as u32),
            (0x90, AVAIL as u32),
            (0xa0, USED as u32),
            (0x44, 1),
            (0x70, 0xf),
        ] {
            w(off, v);
        }
        let (hdr, data, status) = (0x0180_0000u64, 0x0181_0000u64, 0x0182_0000u64);
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&1u64.to_le_bytes());
        mem.write(hdr, &h).unwrap();
        for (i, addr, len, flags, next) in [
            (0u64, hdr, 16u32, 1u16, 1u16),
            (1, data, 512, 3, 2),
            (2, status, 1, 2, 0),
        ] {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            mem.write(DESC + 16 * i, &d).unwrap();
        }
    }
    // Every request reuses chain 0; avail.idx goes up by one.
    let used_before = (mem.read_u64(USED).unwrap() >> 16) as u16;
    let idx = used_before.wrapping_add(1);
    let slot = u64::from(used_before % 4);
    mem.write(AVAIL, &avail_flags.to_le_bytes()).unwrap();
    mem.write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())
        .unwrap();
    mem.write(AVAIL + 2, &idx.to_le_bytes()).unwrap();
    w(0x50, 0);
    wait_for("the block request to complete", 10, || {
        ((mem.read_u64(USED).ok()? >> 16) as u16 == idx).then_some(idx)
    })
}

/// A service VM (not started) running `program` with one disk of `disk_len` bytes in a fresh
/// temporary directory: the directory, the disk's path, the device environment and the VM.
fn vm_with_disk(
    hv: &ferry::vm::Hypervisor,
    tag: &str,
    name: &str,
    program: Vec<u8>,
    disk_len: u64,
) -> (TempDir, PathBuf, DeviceEnv, Vm) {
    let dir = TempDir::new(tag);
    let path = dir.0.join("program.bin");
    std::fs::write(&path, program).unwrap();
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(disk_len)
        .unwrap();
    let env = DeviceEnv {
        bridges: vec![],
        disks: vec![Some(disk.clone())],
    };
    let vm = Vm::create_in(hv, service_spec(name, &path, false), &env).unwrap();
    (dir, disk, env, vm)
}

/// A used buffer on a real KVM VM raises the disk's line: the irqfd for GSI 6 sets bit 6 of
/// the 8259 master's IRR (KVM_GET_IRQCHIP); with VRING_AVAIL_F_NO_INTERRUPT the device leaves
/// the line alone. A VM built for a restore (as a migration's destination is) has its own
/// irqfds registered: a request completed there raises its line.
#[test]
fn virtio_used_buffers_raise_the_gsi_in_kvm() {
    let Some(hv) = hypervisor("virtio_used_buffers_raise_the_gsi_in_kvm") else {
        return;
    };
    let (_dir, _disk, env, vm) = vm_with_disk(&hv, "irq", "irqsrc", probe_program(), 1 << 20);
    let line = 1u8 << BLK_GSI;
    let raised = |vm: &Vm| vm.devices().virtio.blk[0].irq().raised();
    assert_eq!(vm.devices().virtio.blk[0].irq().gsi(), BLK_GSI);
    assert_eq!(
        pic_master_irr(&vm) & line,
        0,
        "line 6 raised before any I/O"
    );
    vm.devices().virtio.activate();
    // Suppressed: the request completes, InterruptStatus is set, the line is not signalled.
    blk_read_request(&vm, true, 1);
    assert_eq!(raised(&vm), 0, "the device signalled despite NO_INTERRUPT");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        pic_master_irr(&vm) & line,
        0,
        "line 6 raised despite NO_INTERRUPT"
    );
    // Not suppressed: signalled, and KVM latched it in the PIC.
    blk_read_request(&vm, false, 0);
    assert_eq!(raised(&vm), 1);
    wait_for("IRR bit 6 of the PIC master", 5, || {
        (pic_master_irr(&vm) & line != 0).then_some(())
    });
    // A VM built for a restore of this state, its PIC's IRR cleared: its own irqfd raises it.
    vm.devices().virtio.quiesce();
    let mut state = vm.capture_state().unwrap();
    // What a migration would carry of guest memory: the rings and the request's buffers.
    let pages: Vec<(u64, Vec<u8>)> = [DESC, AVAIL, USED, 0x0180_0000, 0x0181_0000, 0x0182_0000]
        .into_iter()
        .map(|gpa| {
            let mut b = vec![0u8; 4096];
            vm.memory().read(gpa, &mut b).unwrap();
            (gpa, b)
        })
        .collect();
    vm.stop();
    drop(vm);
    for c in state.irqchips.iter_mut().filter(|c| c.chip_id == 0) {
        // Chip 0 is the union's `pic` member (see pic_master_irr); writing a field is safe.
        c.chip.pic.irr = 0;
    }
    // The device's InterruptStatus was never ACKed; ACK it so activate does not re-pulse.
    for b in &mut state.devices.virtio.blk {
        b.transport.interrupt_status = 0;
    }
    let vm = Vm::create_for_restore_in(&hv, &state, &env).unwrap();
    for (gpa, b) in &pages {
        vm.memory().write(*gpa, b).unwrap();
    }
    vm.restore_state(&state).unwrap();
    assert_eq!(pic_master_irr(&vm) & line, 0, "restored IRR not cleared");
    vm.devices().virtio.activate();
    assert_eq!(raised(&vm), 0, "an ACKed line is not pulsed on activation");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(pic_master_irr(&vm) & line, 0);
    // The driver's queue came with the state: a further request on it.
    assert_eq!(blk_read_request(&vm, false, 0), 3);
    assert_eq!(raised(&vm), 1);
    wait_for("IRR bit 6 of the restored VM's PIC master", 5, || {
        (pic_master_irr(&vm) & line != 0).then_some(())
    });
    vm.stop();
}

/// The CPL3 service guest runs with interrupts off and no IDT: a journaling guest whose every
/// block request raises GSI 6 keeps running with the interrupt pending (the PIC's IRR bit set),
/// before and after a pause, and never faults.
#[test]
fn service_guest_runs_on_with_a_pending_virtio_interrupt() {
    let Some(hv) = hypervisor("service_guest_runs_on_with_a_pending_virtio_interrupt") else {
        return;
    };
    let (_dir, _disk, _env, vm) =
        vm_with_disk(&hv, "irqrun", "irqrun", journal_program(), 16 << 20);
    let line = 1u8 << BLK_GSI;
    assert_eq!(
        pic_master_irr(&vm) & line,
        0,
        "line 6 raised before the guest ran"
    );
    vm.start().unwrap();
    let marks = |vm: &Vm| {
        let c = vm_console(vm);
        assert!(!c.contains("BAD"), "a block request failed: {c}");
        journal_marks(&c)
    };
    wait_for("the journal to advance", 20, || {
        (marks(&vm).last().copied().unwrap_or(0) >= 64).then_some(())
    });
    vm.pause().unwrap();
    let raised = vm.devices().virtio.blk[0].irq().raised();
    let at = marks(&vm).last().copied().unwrap();
    assert!(
        u64::from(at) <= raised,
        "{raised} interrupts for at least {at} requests"
    );
    assert_ne!(
        pic_master_irr(&vm) & line,
        0,
        "the guest's requests raised no line"
    );
    assert!(vm.fault().is_none(), "guest faulted: {:?}", vm.fault());
    vm.resume().unwrap();
    wait_for(
        "the journal to go on with the interrupt pending",
        20,
        || (marks(&vm).last().copied().unwrap_or(0) >= at + 64).then_some(()),
    );
    assert!(vm.fault().is_none(), "guest faulted: {:?}", vm.fault());
    assert_ne!(vm.status(), ferry::vm::VmStatus::Crashed);
    vm.stop();
}
