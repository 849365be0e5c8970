//! The service guest program (`guest/ferry-guest.bin`, built by `cargo xtask build-guest`) on
//! the real /dev/kvm, started as a `raw --mode long-user` image: without BootInfo it says so
//! and idles; with a BootInfo placed in its memory and no devices it runs its main loop and
//! dirties its working set at the requested rate.

use ferry::vm::{GuestKind, RawMode, RawParams, Vm, VmSpec, VmStatus};
use ferry_guest_abi::{BootInfo, BOOT_INFO_ADDR, BOOT_MAGIC, BOOT_VERSION, WORKING_SET_START};
use ferry_tests::{hypervisor, wait_for};

fn raw_service_vm(hv: &ferry::vm::Hypervisor, name: &str, memory_mib: u64) -> Vm {
    let image = xtask::guest::guest_image();
    assert!(
        image.is_file(),
        "{} is missing: run `cargo xtask build-guest`",
        image.display()
    );
    let mut params = RawParams::new(image);
    params.mode = RawMode::LongUser;
    Vm::create(
        hv,
        VmSpec {
            name: name.into(),
            memory_mib,
            vcpus: 1,
            kind: GuestKind::Raw(params),
            disks: vec![],
            nics: vec![],
            cpu: Default::default(),
        },
    )
    .expect("create VM")
}

fn console(vm: &Vm) -> String {
    let c = vm.devices().console.lock().unwrap();
    String::from_utf8_lossy(&c.read_from(0, 1 << 16).1).into_owned()
}

#[test]
fn service_guest_without_boot_info_says_so_and_idles() {
    let Some(hv) = hypervisor("service_guest_without_boot_info_says_so_and_idles") else {
        return;
    };
    let vm = raw_service_vm(&hv, "svc-noinfo", 64);
    vm.start().unwrap();
    let text = wait_for("the no-BootInfo line", 30, || {
        let t = console(&vm);
        t.contains("idling").then_some(t)
    });
    assert!(
        text.starts_with("ferry-guest 0.1.0: service guest starting\n"),
        "{text}"
    );
    assert!(
        text.contains("no BootInfo (rdi = 0, nothing valid at 0x3ff000)"),
        "{text}"
    );
    // It idles (yielding), it does not crash, and it pauses promptly.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(vm.status(), VmStatus::Running, "{:?}", vm.fault());
    vm.pause().unwrap();
    assert_eq!(console(&vm), text, "nothing more is printed while idling");
    vm.stop();
}

#[test]
fn service_guest_without_devices_dirties_its_working_set_at_the_rate() {
    let Some(hv) = hypervisor("service_guest_without_devices_dirties_its_working_set_at_the_rate")
    else {
        return;
    };
    let vm = raw_service_vm(&hv, "svc-dirty", 128);
    let (ws_mib, rate_mib) = (16u32, 32u32);
    let info = BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        size: BootInfo::SIZE as u32,
        tsc_khz: vm.tsc_khz() as u64,
        low_memory_end: 128 << 20,
        ipv4: [198, 18, 2, 10],
        prefix_len: 24,
        _pad0: [0; 3],
        gateway: [0; 4],
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        _pad1: [0; 6],
        net_mmio: 0,
        blk_mmio: 0,
        journal_rate: 200,
        working_set_mib: ws_mib,
        dirty_rate_mib: rate_mib,
        _pad2: 0,
    };
    assert!(info.tsc_khz > 0, "KVM reports no TSC frequency");
    vm.memory().write(BOOT_INFO_ADDR, &info.to_bytes()).unwrap();
    vm.start().unwrap();
    let text = wait_for("ready", 30, || {
        let t = console(&vm);
        t.contains("ferry-guest: ready").then_some(t)
    });
    for want in [
        "ip 198.18.2.10/24 net 0x0 blk 0x0 journal 200/s working set 16 MiB at 32 MiB/s",
        "ferry-guest: no network device; not serving",
        "journal: no disk; no journal",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Page 0 of the working set holds the number of the pass that last wrote it (pass ^ page
    // index, index 0): at 32 MiB/s over 16 MiB, a pass takes 0.5 s.
    let pass = || vm.memory().read_u64(WORKING_SET_START).unwrap();
    wait_for("the first pass", 10, || (pass() >= 1).then_some(()));
    let t0 = std::time::Instant::now();
    let p0 = pass();
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let p1 = pass();
    let secs = t0.elapsed().as_secs_f64();
    let mib_per_sec = (p1 - p0) as f64 * ws_mib as f64 / secs;
    // A pass is counted when page 0 is rewritten, so the estimate is +-1 pass (8 MiB/s here).
    assert!(
        (16.0..=48.0).contains(&mib_per_sec),
        "dirtied about {mib_per_sec:.1} MiB/s ({p0} -> {p1} passes in {secs:.2}s), asked for {rate_mib}"
    );
    // The last page of the working set was written too (pass ^ index, nonzero).
    let last = WORKING_SET_START + (ws_mib as u64 * 256 - 1) * 4096;
    assert_ne!(vm.memory().read_u64(last).unwrap(), 0);
    // Past the working set: untouched.
    assert_eq!(
        vm.memory()
            .read_u64(WORKING_SET_START + ws_mib as u64 * (1 << 20))
            .unwrap(),
        0
    );
    assert_eq!(vm.status(), VmStatus::Running, "{:?}", vm.fault());
    vm.stop();
}
