//! Tests of guest memory: layouts, dirty logging, memfd backing, zero scans.

use std::os::fd::FromRawFd;

use super::*;

#[test]
fn layout_splits_above_3g() {
    assert_eq!(standard_layout(1 << 30).unwrap().len(), 1);
    let l = standard_layout(4 << 30).unwrap();
    assert_eq!(l.len(), 2);
    assert_eq!(l[1].gpa, 4 << 30);
    assert_eq!(l[0].size + l[1].size, 4 << 30);
    assert!(standard_layout(0).is_err());
    assert!(standard_layout(3 << 20).is_err());
}

#[test]
fn bitmap_iter_and_merge() {
    let l = RegionLayout {
        gpa: 0x1000_0000,
        size: 200 * PAGE_SIZE,
    };
    let mut a = RegionBitmap::empty(l);
    a.set(0);
    a.set(63);
    a.set(64);
    a.set(199);
    assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 63, 64, 199]);
    let mut d = DirtyBitmap {
        regions: vec![a.clone()],
    };
    let mut b = RegionBitmap::empty(l);
    b.set(5);
    d.merge(&DirtyBitmap { regions: vec![b] });
    assert_eq!(d.count(), 5);
    assert!(d.contains(0x1000_0000 + 5 * PAGE_SIZE));
    assert!(!d.contains(0x1000_0000 + 6 * PAGE_SIZE));
    assert_eq!(RegionBitmap::full(l).count(), 200);
}

/// Two views of the same memfds, as the VMM and the agent have them.
fn shared_pair(layout: &[RegionLayout]) -> (GuestMemory, GuestMemory) {
    let fds: Vec<OwnedFd> = layout
        .iter()
        .enumerate()
        .map(|(i, l)| create_memfd(i, l.size).unwrap())
        .collect();
    let dups: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
    (
        GuestMemory::map_shared(layout, fds).unwrap(),
        GuestMemory::map_shared(layout, dups).unwrap(),
    )
}

#[test]
fn memfd_memory_is_shared_between_mappings() {
    let layout = [
        RegionLayout {
            gpa: 0,
            size: 64 * PAGE_SIZE,
        },
        RegionLayout {
            gpa: 1 << 30,
            size: 32 * PAGE_SIZE,
        },
    ];
    let (a, b) = shared_pair(&layout);
    assert_eq!(a.backing(), Backing::Memfd);
    assert_eq!(a.memfds().unwrap().len(), 2);
    assert!(!a.has_vm());
    assert_eq!(a.populated().count(), 0, "nothing touched yet");
    a.write_u64(5 * PAGE_SIZE + 8, 0xfeed).unwrap();
    a.write_u64((1 << 30) + 3 * PAGE_SIZE, 7).unwrap();
    assert_eq!(b.read_u64(5 * PAGE_SIZE + 8).unwrap(), 0xfeed);
    assert_eq!(b.read_u64((1 << 30) + 3 * PAGE_SIZE).unwrap(), 7);
    // Populated is what the memfd holds, whichever mapping wrote it.
    let p = b.populated();
    assert_eq!(p.count(), 2);
    assert!(p.contains(5 * PAGE_SIZE) && p.contains((1 << 30) + 3 * PAGE_SIZE));
    // Discard punches a hole: both views read zero and it is no longer populated.
    b.discard(5 * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(a.populated().count(), 1);
    assert_eq!(a.read_u64(5 * PAGE_SIZE + 8).unwrap(), 0);
    // (Reading a hole through a shared mapping allocates it again: readers of a memfd
    // guest skip what `populated` does not list.)
    assert_eq!(a.populated().count(), 2);
    // No KVM behind a shared view: dirty logging is the VMM's business.
    assert!(matches!(a.take_dirty(), Err(MemoryError::NoVm(_))));
    assert!(matches!(
        a.set_dirty_logging(0, true),
        Err(MemoryError::NoVm(_))
    ));
}

#[test]
fn map_shared_refuses_what_could_hurt_the_mapper() {
    let l = [RegionLayout {
        gpa: 0,
        size: 16 * PAGE_SIZE,
    }];
    // Wrong count.
    assert!(GuestMemory::map_shared(&l, vec![]).is_err());
    // Wrong size.
    let small = create_memfd(0, 8 * PAGE_SIZE).unwrap();
    assert!(matches!(
        GuestMemory::map_shared(&l, vec![small]),
        Err(MemoryError::Shared(_))
    ));
    // Not sealed: its owner could shrink it under us.
    // SAFETY: memfd_create with a constant name; the result is checked and owned.
    let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own memfd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), (16 * PAGE_SIZE) as i64) };
    assert_eq!(rc, 0);
    let e = GuestMemory::map_shared(&l, vec![fd]).unwrap_err();
    assert!(e.to_string().contains("not sealed"), "{e}");
    // Not a memfd at all.
    let f = std::fs::File::open("/dev/null").unwrap();
    assert!(GuestMemory::map_shared(&l, vec![OwnedFd::from(f)]).is_err());
    // The seals hold: the memfd cannot shrink.
    let sealed = create_memfd(0, 16 * PAGE_SIZE).unwrap();
    // SAFETY: ftruncate on our own memfd (refused by the seal).
    assert_ne!(unsafe { libc::ftruncate(sealed.as_raw_fd(), 0) }, 0);
}

#[test]
fn zero_scan() {
    let mut p = vec![0u8; 4096];
    assert!(is_zero(&p));
    p[4095] = 1;
    assert!(!is_zero(&p));
    p[4095] = 0;
    p[70] = 1;
    assert!(!is_zero(&p));
    assert!(is_zero(&[0u8; 3]));
}
