//! The KVM guest runtime against the real /dev/kvm: workload guests run at CPL3 and can be
//! verified page by page, pause/resume, crash reporting, and state capture/restore.

use ferry::vm::workload::{self, WorkloadParams};
use ferry::vm::{GuestKind, Profile, Vm, VmSpec, VmStatus};
use ferry_tests::{hypervisor, wait_for};

fn workload_spec(name: &str, memory_mib: u64, vcpus: u32, profile: Profile, rate: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_mib,
        vcpus,
        kind: GuestKind::Workload(WorkloadParams {
            profile,
            dirty_rate_mib: rate,
            working_set_mib: None,
        }),
        disks: vec![],
        nics: vec![],
        cpu: Default::default(),
    }
}

fn params(vm: &Vm) -> WorkloadParams {
    match &vm.spec.kind {
        GuestKind::Workload(p) => p.clone(),
        _ => unreachable!(),
    }
}

fn wait_filled(vm: &Vm) {
    wait_for("workload fill", 60, || {
        let hb = vm.heartbeats()?;
        hb.iter().all(|h| h.phase == 1).then_some(())
    });
}

#[test]
fn workload_runs_and_its_memory_verifies() {
    let Some(hv) = hypervisor("workload_runs_and_its_memory_verifies") else {
        return;
    };
    let vm = Vm::create(&hv, workload_spec("w1", 64, 2, Profile::Mixed, 64)).unwrap();
    vm.start().unwrap();
    wait_filled(&vm);
    let before = vm.heartbeats().unwrap();
    wait_for("progress", 10, || {
        let hb = vm.heartbeats()?;
        hb.iter()
            .zip(&before)
            .all(|(a, b)| a.progress > b.progress + 10)
            .then_some(())
    });
    vm.pause().unwrap();
    assert_eq!(vm.status(), VmStatus::Paused);
    let rep = workload::verify(vm.memory(), 2, &params(&vm)).unwrap();
    assert!(rep.ok(), "bad pages: {rep:?}");
    assert!(rep.pages_checked > 10_000);
    // Paused means paused: nothing moves.
    let a = vm.heartbeats().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(a, vm.heartbeats().unwrap());
    vm.resume().unwrap();
    wait_for("beats after resume", 10, || {
        let hb = vm.heartbeats()?;
        (hb[0].beats > a[0].beats).then_some(())
    });
}

/// Compare two paused guests' memory byte for byte; returns the first differing address.
fn first_difference(a: &Vm, b: &Vm) -> Option<u64> {
    let (ma, mb) = (a.memory(), b.memory());
    assert_eq!(ma.layout(), mb.layout());
    let mut pa = vec![0u8; 1 << 20];
    let mut pb = vec![0u8; 1 << 20];
    for l in ma.layout() {
        let mut off = 0;
        while off < l.size {
            ma.read(l.gpa + off, &mut pa).unwrap();
            mb.read(l.gpa + off, &mut pb).unwrap();
            if pa != pb {
                let i = pa.iter().zip(&pb).position(|(x, y)| x != y).unwrap();
                return Some(l.gpa + off + i as u64);
            }
            off += 1 << 20;
        }
    }
    None
}

fn tsc_msr(st: &ferry::vm::state::VmState, vcpu: usize) -> u64 {
    st.vcpus[vcpu]
        .msrs
        .iter()
        .find(|m| m.index == 0x10)
        .expect("IA32_TSC is captured")
        .data
}

fn round_trip(name: &str, memory_mib: u64, vcpus: u32) {
    let Some(hv) = hypervisor(name) else { return };
    let vm = Vm::create(
        &hv,
        workload_spec(name, memory_mib, vcpus, Profile::Mixed, 64),
    )
    .unwrap();
    vm.start().unwrap();
    wait_filled(&vm);
    std::thread::sleep(std::time::Duration::from_millis(200));
    vm.pause().unwrap();
    let at_pause = vm.heartbeats().unwrap();
    let saved = vm.capture_state().unwrap();
    let captured_at = std::time::Instant::now();

    let copy = ferry::vm::snapshot::clone_paused(&hv, &vm, &format!("{name}-copy")).unwrap();
    assert_eq!(
        first_difference(&vm, &copy),
        None,
        "memory differs after restore"
    );
    assert_eq!(copy.heartbeats().unwrap(), at_pause);
    let restored = copy.capture_state().unwrap();
    let gap = captured_at.elapsed();
    for v in 0..vcpus as usize {
        let (a, b) = (&saved.vcpus[v], &restored.vcpus[v]);
        assert_eq!(a.regs, b.regs, "vCPU {v} registers");
        assert_eq!(a.sregs, b.sregs, "vCPU {v} special registers");
        assert_eq!(
            a.xsave.as_ref().map(|x| x.0.region),
            b.xsave.as_ref().map(|x| x.0.region)
        );
        assert_eq!(a.events.exception.nr, b.events.exception.nr);
        assert_eq!(a.mp_state, b.mp_state);
        // The TSC continues from the saved value: never backwards, and not further than the
        // time that passed (a KVM that cannot offset the TSC, like this lab's paravirtual one,
        // shows the host's TSC, which advanced by exactly that).
        let (t0, t1) = (tsc_msr(&saved, v), tsc_msr(&restored, v));
        let budget = u64::from(hv.tsc_khz) * (gap.as_millis() as u64 + 1000);
        assert!(
            t1 >= t0 && t1 - t0 < budget,
            "TSC jumped: {t0} -> {t1} over {gap:?}"
        );
    }
    // The source is gone for good; the copy carries on exactly where it stopped.
    drop(vm);
    copy.start().unwrap();
    wait_for("copy makes progress", 20, || {
        let hb = copy.heartbeats()?;
        hb.iter()
            .zip(&at_pause)
            .all(|(n, o)| n.beats > o.beats && n.progress > o.progress && n.filled == o.filled)
            .then_some(())
    });
    copy.pause().unwrap();
    let after = copy.heartbeats().unwrap();
    for (n, o) in after.iter().zip(&at_pause) {
        // The guest's clock did not jump across the restore: its TSC advanced by about the wall time it ran.
        assert!(n.tsc > o.tsc && n.tsc - o.tsc < u64::from(hv.tsc_khz) * 1000 * 30);
    }
    let rep = workload::verify(copy.memory(), vcpus, &params(&copy)).unwrap();
    assert!(rep.ok(), "restored guest's memory does not verify: {rep:?}");
}

#[test]
fn round_trip_256m_1vcpu() {
    round_trip("rt-256m-1", 256, 1);
}

#[test]
fn round_trip_256m_2vcpu() {
    round_trip("rt-256m-2", 256, 2);
}

#[test]
fn round_trip_2g_1vcpu() {
    round_trip("rt-2g-1", 2048, 1);
}

#[test]
fn round_trip_2g_2vcpu() {
    round_trip("rt-2g-2", 2048, 2);
}

/// The kernel's dirty_log_test idea: per page, the dirty bit and the content agree. Between two
/// pauses the guest wrote exactly the pages its progress counters say; the dirty bitmap must
/// hold every one of them and no other data page.
#[test]
fn dirty_log_matches_what_the_guest_wrote() {
    let Some(hv) = hypervisor("dirty_log_matches_what_the_guest_wrote") else {
        return;
    };
    let spec = VmSpec {
        name: "dirty".into(),
        memory_mib: 128,
        vcpus: 2,
        kind: GuestKind::Workload(WorkloadParams {
            profile: Profile::Random,
            dirty_rate_mib: 200,
            working_set_mib: Some(16),
        }),
        disks: vec![],
        nics: vec![],
        cpu: Default::default(),
    };
    let p = match &spec.kind {
        GuestKind::Workload(p) => p.clone(),
        _ => unreachable!(),
    };
    let vm = Vm::create(&hv, spec).unwrap();
    vm.start().unwrap();
    wait_filled(&vm);
    vm.pause().unwrap();
    let mem = vm.memory();
    mem.set_dirty_logging_all(true).unwrap();
    let _ = mem.take_dirty().unwrap();
    let data = workload::DataLayout::new(&mem.layout(), 2, p.working_set_mib.map(|m| m << 20));
    let mut prev = vm.heartbeats().unwrap();
    let mut total_checked = 0;
    for round in 0..8 {
        vm.resume().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        vm.pause().unwrap();
        let bm = mem.take_dirty().unwrap();
        let now = vm.heartbeats().unwrap();
        let mut expected = std::collections::BTreeSet::new();
        let mut maybe = std::collections::BTreeSet::new();
        for (v, &(start, _len, ws)) in data.slices.iter().enumerate() {
            for q in prev[v].progress..now[v].progress {
                expected.insert(data.gpa(start + q % ws));
            }
            // A page whose write was cut by a pause may be dirty in either interval.
            maybe.insert(data.gpa(start + prev[v].progress % ws));
            maybe.insert(data.gpa(start + now[v].progress % ws));
        }
        let data_start = data.r0_base;
        for &g in &expected {
            assert!(
                bm.contains(g),
                "round {round}: page {g:#x} was written but is not dirty"
            );
        }
        for g in bm.iter_gpa().filter(|&g| g >= data_start) {
            assert!(
                expected.contains(&g) || maybe.contains(&g),
                "round {round}: page {g:#x} is dirty but the guest did not write it"
            );
        }
        total_checked += expected.len();
        let rep = workload::verify(mem, 2, &p).unwrap();
        assert!(rep.ok(), "round {round}: {rep:?}");
        prev = now;
    }
    assert!(
        total_checked > 1000,
        "the guest wrote too little to prove anything: {total_checked}"
    );

    // Pages the agent writes are dirty too, and dirty state handed back is not lost.
    let g = data.gpa(data.total_pages - 1);
    mem.write(g, &[1, 2, 3]).unwrap();
    let bm = mem.take_dirty().unwrap();
    assert!(bm.contains(g));
    assert!(!mem.take_dirty().unwrap().contains(g));
    mem.mark_dirty(&bm);
    assert!(mem.take_dirty().unwrap().contains(g));
    // Without dirty logging every page counts as dirty.
    mem.set_dirty_logging_all(false).unwrap();
    assert_eq!(mem.take_dirty().unwrap().count(), mem.size() / 4096);
}

fn hello_image() -> Vec<u8> {
    ferry::vm::raw::hello_image("hello from a raw guest\n")
}

#[test]
fn raw_image_prints_on_the_serial_console() {
    let Some(hv) = hypervisor("raw_image_prints_on_the_serial_console") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ferry-raw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("hello.img");
    std::fs::write(&img, hello_image()).unwrap();
    let vm = Vm::create(
        &hv,
        VmSpec {
            name: "raw".into(),
            memory_mib: 16,
            vcpus: 1,
            kind: GuestKind::Raw(ferry::vm::RawParams::new(img.clone())),
            disks: vec![],
            nics: vec![],
            cpu: Default::default(),
        },
    )
    .unwrap();
    vm.start().unwrap();
    let text = wait_for("console output", 30, || {
        let c = vm.devices().console.lock().unwrap();
        let (_, bytes) = c.read_from(0, 4096);
        bytes
            .ends_with(b"\n")
            .then(|| String::from_utf8_lossy(&bytes).into_owned())
    });
    assert_eq!(text, "hello from a raw guest\n");
    // Halted with interrupts off, it still pauses promptly.
    vm.pause().unwrap();
    assert_eq!(vm.status(), VmStatus::Paused);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn triple_fault_is_reported_as_crashed() {
    let Some(hv) = hypervisor("triple_fault_is_reported_as_crashed") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ferry-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("crash.img");
    // A long-mode CPL3 image: print "x", then ud2 with no IDT -> triple fault.
    std::fs::write(&img, [0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0x0f, 0x0b]).unwrap();
    let mut params = ferry::vm::RawParams::new(img);
    params.mode = ferry::vm::RawMode::LongUser;
    let vm = Vm::create(
        &hv,
        VmSpec {
            name: "crash".into(),
            memory_mib: 16,
            vcpus: 2,
            kind: GuestKind::Raw(params),
            disks: vec![],
            nics: vec![],
            cpu: Default::default(),
        },
    )
    .unwrap();
    vm.start().unwrap();
    wait_for("crash", 30, || {
        (vm.status() == VmStatus::Crashed).then_some(())
    });
    let f = vm.fault().unwrap();
    assert!(f.reason.contains("triple fault"), "{f:?}");
    assert_eq!(
        vm.devices().console.lock().unwrap().read_from(0, 10).1,
        b"x"
    );
    assert!(vm.resume().is_err());
    assert!(vm.pause().is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_shapes_are_refused() {
    let Some(hv) = hypervisor("bad_shapes_are_refused") else {
        return;
    };
    let e = Vm::create(&hv, workload_spec("z", 64, 0, Profile::Zero, 0)).unwrap_err();
    assert!(e.to_string().contains("vCPUs"), "{e}");
    let e = Vm::create(&hv, workload_spec("z", 63, 1, Profile::Zero, 0)).unwrap_err();
    assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
    let dir = std::env::temp_dir().join(format!("ferry-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("big.img");
    std::fs::write(&img, vec![0x90u8; 3 << 20]).unwrap();
    let e = Vm::create(
        &hv,
        VmSpec {
            name: "big".into(),
            memory_mib: 2,
            vcpus: 1,
            kind: GuestKind::Raw(ferry::vm::RawParams::new(img)),
            disks: vec![],
            nics: vec![],
            cpu: Default::default(),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("fit"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
