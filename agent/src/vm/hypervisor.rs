//! The host's KVM, opened once per agent: what it offers guests (MSRs, CPUID, TSC) and the
//! host-wide settings every VM of this agent uses.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::cpuid::{self, CpuPolicy, CpuidEntry, FeatureBit};
use super::{kvm_err, VmError};

/// The host's KVM, opened once per agent.
pub struct Hypervisor {
    pub(super) kvm: Kvm,
    /// MSRs that can be read and written on this host (from KVM_GET_MSR_INDEX_LIST, probed).
    pub(super) msr_list: Arc<Vec<u32>>,
    cpuid: CpuId,
    /// TSC frequency a fresh vCPU gets.
    pub tsc_khz: u32,
    /// Back guest memory with transparent huge pages (`[limits] huge_pages`, default on).
    pub huge_pages: std::sync::atomic::AtomicBool,
    /// Back guest memory with sealed memfds that another process can map (a `ferry vmm`
    /// process's guests, see docs/vmm.md); default off: private anonymous memory.
    pub memfd_backing: std::sync::atomic::AtomicBool,
    /// CPU features this host does not offer to guests (`[cpu] mask`).
    host_mask: Mutex<BTreeSet<FeatureBit>>,
    /// Whether KVM honours a written IA32_TSC (false on backends where the guest reads the
    /// host's TSC directly; then a restored guest's TSC continues at host time instead).
    pub tsc_settable: bool,
}

impl std::fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypervisor")
            .field("msrs", &self.msr_list.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish()
    }
}

impl Hypervisor {
    /// Open /dev/kvm and probe what this host offers.
    pub fn open() -> Result<Arc<Hypervisor>, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let listed = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        // Probe on a throwaway vCPU which listed MSRs can really be read and written back.
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "KVM does not report a TSC frequency; assuming 2 GHz for guest pacing");
            2_000_000
        });
        let mut usable = Vec::with_capacity(listed.len());
        for index in listed {
            let entry = kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            };
            let Ok(mut m) = kvm_bindings::Msrs::from_entries(&[entry]) else {
                continue;
            };
            if vcpu.get_msrs(&mut m) != Ok(1) {
                continue;
            }
            if vcpu.set_msrs(&m) != Ok(1) {
                continue;
            }
            usable.push(index);
        }
        let tsc_settable = probe_tsc_write(&vcpu);
        tracing::debug!(msrs = usable.len(), tsc_khz, tsc_settable, "KVM probed");
        Ok(Arc::new(Hypervisor {
            kvm,
            msr_list: Arc::new(usable),
            cpuid,
            tsc_khz,
            huge_pages: std::sync::atomic::AtomicBool::new(true),
            memfd_backing: std::sync::atomic::AtomicBool::new(false),
            host_mask: Mutex::new(BTreeSet::new()),
            tsc_settable,
        }))
    }

    /// The MSRs saved and restored for every vCPU.
    pub fn msr_list(&self) -> &[u32] {
        &self.msr_list
    }

    /// Hide `features` from every guest this host runs or receives (`[cpu] mask`).
    pub fn set_host_mask(&self, features: BTreeSet<FeatureBit>) {
        if let Ok(mut m) = self.host_mask.lock() {
            *m = features;
        }
    }

    fn host_mask(&self) -> BTreeSet<FeatureBit> {
        self.host_mask.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The CPUID this host offers guests (KVM's supported CPUID less the host mask).
    pub fn offered_cpuid(&self) -> Vec<CpuidEntry> {
        let mut v = to_entries(self.cpuid.as_slice());
        cpuid::apply(&mut v, &self.host_mask());
        v
    }

    pub(super) fn vcpu_cpuid(&self, id: u32, policy: &CpuPolicy) -> Result<CpuId, VmError> {
        let mut hidden = self.host_mask();
        hidden.extend(
            policy
                .hidden()
                .map_err(|e| VmError::Device(e.to_string()))?,
        );
        let mut c = self.cpuid.clone();
        for e in c.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
                0xb | 0x1f => e.edx = id,
                _ => {}
            }
            for f in hidden
                .iter()
                .filter(|f| f.leaf == e.function && f.subleaf == e.index)
            {
                let r = match f.reg {
                    cpuid::Reg::Eax => &mut e.eax,
                    cpuid::Reg::Ebx => &mut e.ebx,
                    cpuid::Reg::Ecx => &mut e.ecx,
                    cpuid::Reg::Edx => &mut e.edx,
                };
                *r &= !(1u32 << f.bit);
            }
        }
        Ok(c)
    }
}

/// KVM CPUID entries as plain [`CpuidEntry`]s.
pub fn to_entries(e: &[kvm_bindings::kvm_cpuid_entry2]) -> Vec<CpuidEntry> {
    e.iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}
/// Write a small IA32_TSC and see whether it reads back small.
fn probe_tsc_write(vcpu: &kvm_ioctls::VcpuFd) -> bool {
    const IA32_TSC: u32 = 0x10;
    let e = kvm_bindings::kvm_msr_entry {
        index: IA32_TSC,
        data: 1000,
        ..Default::default()
    };
    let Ok(m) = kvm_bindings::Msrs::from_entries(&[e]) else {
        return false;
    };
    if vcpu.set_msrs(&m) != Ok(1) {
        return false;
    }
    let Ok(mut r) = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }]) else {
        return false;
    };
    vcpu.get_msrs(&mut r) == Ok(1) && r.as_slice()[0].data < 1 << 40
}
