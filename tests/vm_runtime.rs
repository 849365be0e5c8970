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
    let Some(hv) = hypervisor("workload_runs_and_its_memory_verifies") else { return };
    let vm = Vm::create(&hv, workload_spec("w1", 64, 2, Profile::Mixed, 64)).unwrap();
    vm.start().unwrap();
    wait_filled(&vm);
    let before = vm.heartbeats().unwrap();
    wait_for("progress", 10, || {
        let hb = vm.heartbeats()?;
        hb.iter().zip(&before).all(|(a, b)| a.progress > b.progress + 10).then_some(())
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
