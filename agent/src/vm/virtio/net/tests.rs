//! Tests of virtio-net through the MMIO transport, with a fake guest memory and a test driver.

use super::super::fake::FakeMem;
use super::super::mmio::tests::bring_up;
use super::super::mmio::{REG_QUEUE_NOTIFY, STATUS_DRIVER_OK};
use super::super::queue::driver::TestQueue;
use super::super::queue::AVAIL_F_NO_INTERRUPT;
use super::*;

fn up(mem: &Arc<FakeMem>) -> (Arc<NetDevice>, TestQueue, TestQueue) {
    let dev = NetDevice::new(
        "t",
        [0x52, 0x54, 0, 1, 2, 3],
        None,
        mem.clone(),
        Arc::new(Waker::default()),
        Irq::detached(5),
    )
    .unwrap();
    let rx = TestQueue::new(0x1000, 16);
    let tx = TestQueue::new(0x3000, 16);
    let mut g = dev.inner.lock().unwrap();
    let st = bring_up(
        &mut g.t,
        super::super::mmio::F_VERSION_1 | F_MAC | F_STATUS,
        &[rx.state(), tx.state()],
    );
    assert_ne!(st & STATUS_DRIVER_OK, 0);
    drop(g);
    (dev, rx, tx)
}

#[test]
fn used_buffers_raise_the_line_unless_the_driver_suppressed_it() {
    let mem = FakeMem::new(1 << 20);
    let (dev, mut rx, mut tx) = up(&mem);
    dev.start_delivery();
    assert_eq!(dev.irq().raised(), 0, "nothing used yet, nothing raised");
    // RX: a frame into a posted buffer raises the line and sets InterruptStatus.
    rx.post(&mem, &[(0x10000, 2048, true)]);
    dev.receive([vec![0xaa; 60]]);
    assert_eq!(rx.take_used(&mem).len(), 1);
    assert_eq!(dev.irq().raised(), 1);
    let mut b = [0u8; 4];
    dev.mmio_read(super::super::mmio::REG_INTERRUPT_STATUS, &mut b);
    assert_eq!(u32::from_le_bytes(b), super::super::mmio::INT_USED);
    dev.mmio_write(
        super::super::mmio::REG_INTERRUPT_ACK,
        &super::super::mmio::INT_USED.to_le_bytes(),
    );
    // RX with VRING_AVAIL_F_NO_INTERRUPT: used, status set, line left alone.
    rx.set_avail_flags(&mem, AVAIL_F_NO_INTERRUPT);
    rx.post(&mem, &[(0x11000, 2048, true)]);
    dev.receive([vec![0xbb; 60]]);
    assert_eq!(rx.take_used(&mem).len(), 1);
    assert_eq!(dev.irq().raised(), 1);
    dev.mmio_read(super::super::mmio::REG_INTERRUPT_STATUS, &mut b);
    assert_eq!(u32::from_le_bytes(b), super::super::mmio::INT_USED);
    // TX: the flag is per queue; the TX queue still interrupts.
    tx.post(&mem, &[(0x20000, (NET_HDR + 60) as u32, false)]);
    dev.mmio_write(REG_QUEUE_NOTIFY, &1u32.to_le_bytes());
    assert_eq!(tx.take_used(&mem).len(), 1);
    assert_eq!(dev.irq().raised(), 2);
    tx.set_avail_flags(&mem, AVAIL_F_NO_INTERRUPT);
    tx.post(&mem, &[(0x20000, (NET_HDR + 60) as u32, false)]);
    dev.mmio_write(REG_QUEUE_NOTIFY, &1u32.to_le_bytes());
    assert_eq!(tx.take_used(&mem).len(), 1);
    assert_eq!(dev.irq().raised(), 2);
    // Resumed with InterruptStatus still set (never ACKed): pulsed again.
    dev.stop_delivery();
    dev.start_delivery();
    assert_eq!(dev.irq().raised(), 3);
}

#[test]
fn config_space_has_the_mac_and_link_up() {
    let mem = FakeMem::new(1 << 20);
    let (dev, _, _) = up(&mem);
    let mut b = [0u8; 8];
    dev.mmio_read(0x100, &mut b);
    assert_eq!(&b[..6], &[0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), 1);
}

#[test]
fn rx_waits_for_resume_and_buffers_and_marks_pages_dirty() {
    let mem = FakeMem::new(1 << 20);
    let (dev, mut rx, _) = up(&mem);
    // Paused (never started): frames queue.
    dev.receive([vec![0xaa; 60], vec![0xbb; 70]]);
    assert_eq!(rx.take_used(&mem), vec![]);
    let before = mem.snapshot();
    dev.start_delivery();
    // No buffers posted yet: still queued.
    assert_eq!(dev.stats().rx_queued, 2);
    rx.post(&mem, &[(0x10000, 2048, true)]);
    dev.mmio_write(REG_QUEUE_NOTIFY, &0u32.to_le_bytes());
    let used = rx.take_used(&mem);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, (NET_HDR + 60) as u32);
    let hdr = mem.guest_read(0x10000, NET_HDR);
    assert_eq!(&hdr[10..], &1u16.to_le_bytes());
    assert_eq!(mem.guest_read(0x10000 + NET_HDR as u64, 60), vec![0xaa; 60]);
    mem.assert_changes_dirty(&before);
    assert!(mem.dirty.lock().unwrap().contains(&(0x10000 / 4096)));
    // Pause again: the remaining frame stays queued and is in the state.
    assert_eq!(dev.stop_delivery(), 1);
    rx.post(&mem, &[(0x11000, 2048, true)]);
    dev.mmio_write(REG_QUEUE_NOTIFY, &0u32.to_le_bytes());
    assert_eq!(rx.take_used(&mem), vec![]);
    let st = dev.state();
    assert_eq!(st.rx_frames, vec![vec![0xbb; 70]]);
    // Restored elsewhere (fresh memory with the same rings): delivered there on resume.
    let mem2 = FakeMem::new(1 << 20);
    mem2.guest_write(0, &mem.snapshot());
    let dev2 = NetDevice::new(
        "t",
        [0x52, 0x54, 0, 1, 2, 3],
        None,
        mem2.clone(),
        Arc::new(Waker::default()),
        Irq::detached(5),
    )
    .unwrap();
    dev2.receive([vec![0xcc; 10]]); // flooded copy queued on the destination: replaced
    dev2.restore(&st).unwrap();
    assert_eq!(dev2.state(), st);
    assert_eq!((dev2.stats().rx_replaced, dev2.stats().rx_dropped), (1, 0));
    let before = mem2.snapshot();
    dev2.start_delivery();
    let used = rx.take_used(&mem2);
    assert_eq!(used, vec![(1, (NET_HDR + 70) as u32)]);
    assert_eq!(
        mem2.guest_read(0x11000 + NET_HDR as u64, 70),
        vec![0xbb; 70]
    );
    mem2.assert_changes_dirty(&before);
}

#[test]
fn frames_after_the_capture_are_the_backlog_and_never_delivered_here() {
    let mem = FakeMem::new(1 << 20);
    let (dev, _, _) = up(&mem);
    let mac = dev.mac();
    let to_guest = |b: u8| {
        let mut f = vec![b; 60];
        f[..6].copy_from_slice(&mac);
        f
    };
    // Never captured: nothing belongs to a destination.
    dev.receive([to_guest(1)]);
    assert!(dev.take_backlog().is_none());
    dev.receive([to_guest(2)]);
    let st = dev.state();
    assert_eq!(st.rx_frames, vec![to_guest(1), to_guest(2)]);
    dev.receive([to_guest(3), vec![0xff; 60], to_guest(4)]);
    let backlog = dev.take_backlog().unwrap();
    assert_eq!(backlog, vec![to_guest(3), vec![0xff; 60], to_guest(4)]);
    // The queue is empty: the carried frames are the destination's now.
    assert_eq!(dev.stats().rx_queued, 0);
    assert!(addressed_to(&backlog[0], &mac));
    assert!(!addressed_to(&backlog[1], &mac));
    assert!(!addressed_to(&mac, &mac), "shorter than an Ethernet header");
    // A failed migration resumes instead: the mark goes and everything stays queued.
    dev.receive([to_guest(5)]);
    let _ = dev.state();
    dev.receive([to_guest(6)]);
    dev.start_delivery();
    dev.stop_delivery();
    assert!(dev.take_backlog().is_none());
    assert_eq!(dev.stats().rx_queued, 2);
}

#[test]
fn forwarded_frames_queue_behind_the_carried_ones() {
    let mem = FakeMem::new(1 << 20);
    let (dev, mut rx, _) = up(&mem);
    let mut st = dev.state();
    st.rx_frames = vec![vec![0xaa; 60]];
    dev.restore(&st).unwrap();
    dev.receive_forwarded(vec![vec![0xbb; 60], vec![0xcc; 60]]);
    assert_eq!(dev.stats().rx_forwarded, 2);
    rx.post(&mem, &[(0x10000, 2048, true)]);
    rx.post(&mem, &[(0x11000, 2048, true)]);
    rx.post(&mem, &[(0x12000, 2048, true)]);
    dev.start_delivery();
    assert_eq!(rx.take_used(&mem).len(), 3);
    for (i, b) in [0xaa, 0xbb, 0xcc].into_iter().enumerate() {
        let at = 0x10000 + 0x1000 * i as u64 + NET_HDR as u64;
        assert_eq!(mem.guest_read(at, 60), vec![b; 60], "frame {i}");
    }
}

#[test]
fn rx_queue_is_bounded() {
    let mem = FakeMem::new(1 << 20);
    let (dev, _, _) = up(&mem);
    dev.receive((0..RX_QUEUE_MAX + 5).map(|_| vec![1u8; 20]));
    let s = dev.stats();
    assert_eq!(s.rx_queued, RX_QUEUE_MAX as u64);
    assert_eq!(s.rx_dropped, 5);
}

#[test]
fn tx_consumes_frames_without_a_tap() {
    let mem = FakeMem::new(1 << 20);
    let (dev, _, mut tx) = up(&mem);
    mem.guest_write(0x20000, &[0u8; NET_HDR]);
    mem.guest_write(0x20000 + NET_HDR as u64, &[0x55; 64]);
    tx.post(&mem, &[(0x20000, (NET_HDR + 64) as u32, false)]);
    tx.post(&mem, &[(0x20000, 4, false)]); // too short: a bad chain, still returned
    dev.mmio_write(REG_QUEUE_NOTIFY, &1u32.to_le_bytes());
    assert_eq!(tx.take_used(&mem).len(), 2);
    let s = dev.stats();
    assert_eq!((s.tx_dropped, s.bad_chains), (1, 1));
}

#[test]
fn restore_refuses_a_foreign_state() {
    let mem = FakeMem::new(1 << 20);
    let (dev, _, _) = up(&mem);
    let mut st = dev.state();
    st.mac[5] ^= 1;
    assert!(dev.restore(&st).is_err());
    let mut st = dev.state();
    st.rx_frames = vec![vec![0; 10]; RX_QUEUE_MAX + 1];
    assert!(dev.restore(&st).is_err());
}
