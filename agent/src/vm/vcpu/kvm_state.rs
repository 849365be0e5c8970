//! A vCPU's state as KVM holds it: read all of it ([`capture`]) and write it back
//! ([`restore`]), on the vCPU's own thread while it is parked.

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use super::{VcpuError, VcpuState};

fn kvm_err(id: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

/// Read everything KVM knows about a vCPU.
pub fn capture(fd: &VcpuFd, id: u32, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(id, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let regs = fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let fpu = fd.get_fpu().map_err(kvm_err(id, "KVM_GET_FPU"))?;
    let xsave = fd.get_xsave().ok().map(crate::vm::state::Xsave);
    let xcrs = fd.get_xcrs().ok();
    let lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    let entries: Vec<kvm_bindings::kvm_msr_entry> = msr_list
        .iter()
        .map(|&index| kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
        id,
        done: 0,
        total: entries.len(),
        index: 0,
    })?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(VcpuError::Msrs {
            id,
            done: n,
            total: entries.len(),
            index: entries.get(n).map_or(0, |e| e.index),
        });
    }
    let msrs = msrs.as_slice().to_vec();
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
    let mp_state = fd.get_mp_state().map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
    let debugregs = fd
        .get_debug_regs()
        .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        id,
        cpuid,
        regs,
        sregs,
        fpu: (&fpu).into(),
        xsave,
        xcrs,
        lapic,
        msrs,
        events,
        mp_state,
        debugregs,
        tsc_khz,
    })
}

/// Load a captured state into a vCPU. The order follows what KVM needs: CPUID first, XCRs
/// before XSAVE, special registers before MSRs, LAPIC before events.
pub fn restore(fd: &VcpuFd, id: u32, st: &VcpuState) -> Result<(), VcpuError> {
    let cpuid = CpuId::from_entries(&st.cpuid).map_err(|_| VcpuError::Msrs {
        id,
        done: 0,
        total: st.cpuid.len(),
        index: 0,
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    if let Some(khz) = st.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!(vcpu = id, saved_khz = khz, error = %e, "cannot set the guest's TSC frequency here; its clock runs at this host's rate");
            }
        }
    }
    fd.set_sregs(&st.sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    fd.set_regs(&st.regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
    fd.set_fpu(&(&st.fpu).into())
        .map_err(kvm_err(id, "KVM_SET_FPU"))?;
    if let Some(x) = &st.xcrs {
        fd.set_xcrs(x).map_err(kvm_err(id, "KVM_SET_XCRS"))?;
    }
    if let Some(x) = &st.xsave {
        // SAFETY: `x` is a complete kvm_xsave (4 KiB legacy area) captured by KVM_GET_XSAVE,
        // which is exactly what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&x.0) }.map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
    }
    fd.set_lapic(&st.lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&st.msrs).map_err(|_| VcpuError::Msrs {
        id,
        done: 0,
        total: st.msrs.len(),
        index: 0,
    })?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if n != st.msrs.len() {
        return Err(VcpuError::Msrs {
            id,
            done: n,
            total: st.msrs.len(),
            index: st.msrs.get(n).map_or(0, |e| e.index),
        });
    }
    fd.set_vcpu_events(&st.events)
        .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    fd.set_mp_state(st.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_debug_regs(&st.debugregs)
        .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
    Ok(())
}
