//! The complete, serializable state of a guest apart from its memory: every vCPU's registers and
//! the VM-wide and device state. One versioned structure, [`VmState`], used for `vm save` files
//! and (later) sent on the wire at switchover.
//!
//! ## Encoding
//!
//! ```text
//! offset  size  field
//! 0       8     magic  "FERRYST\0"
//! 8       4     format version, little-endian (STATE_VERSION)
//! 12      4     body length N, little-endian
//! 16      N     body: VmState encoded with postcard (serde)
//! 16+N    4     CRC-32C of the body, little-endian
//! ```
//!
//! KVM's own structures (`kvm_regs`, `kvm_sregs`, `kvm_xsave`, `kvm_lapic_state`, ...) travel as
//! their kernel byte layout (kvm-bindings' serde support). The decoder accepts this version and
//! the previous ones (1 and 2: no virtio devices); anything else is refused with a message naming
//! the range.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::devices::{DeviceState, DeviceStateV2};
use super::memory::RegionLayout;
use super::VmSpec;

pub const STATE_MAGIC: [u8; 8] = *b"FERRYST\0";
/// Current format version (2: the VM spec carries disks, NICs and a CPU policy; 3: virtio
/// device state).
pub const STATE_VERSION: u32 = 3;
/// Oldest version this build can read.
pub const STATE_MIN_VERSION: u32 = 1;

/// Errors decoding or encoding [`VmState`].
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("not a Ferry state blob (bad magic); was it written by `ferry vm save`?")]
    Magic,
    #[error("state format version {found} is not supported (this build reads {min}..={max}); use a matching Ferry version")]
    Version { found: u32, min: u32, max: u32 },
    #[error("state blob truncated: {0}")]
    Truncated(&'static str),
    #[error("state blob is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { found: u32, expected: u32 },
    #[error("state body does not decode: {0}")]
    Decode(#[from] postcard::Error),
}

/// The x87/SSE state as `KVM_GET_FPU` returns it (used only where XSAVE is unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The legacy 4 KiB XSAVE area of `KVM_GET_XSAVE` (kvm_xsave itself is not `Clone`).
#[derive(Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Xsave(pub kvm_xsave);

impl Clone for Xsave {
    fn clone(&self) -> Self {
        Xsave(kvm_xsave {
            region: self.0.region,
            ..Default::default()
        })
    }
}

impl std::fmt::Debug for Xsave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xsave { .. }")
    }
}

/// Everything KVM knows about one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// XSAVE area (x87, SSE, AVX, ...); `None` where KVM has no XSAVE.
    pub xsave: Option<Xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    /// Every MSR that KVM lists and lets us read, including IA32_TSC (so the guest's TSC
    /// continues where it stopped instead of jumping).
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    /// The vCPU's TSC frequency, when KVM reports one.
    pub tsc_khz: Option<u32>,
}

/// Everything needed to recreate a guest apart from its memory contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// What the guest is (name, size, kind and its parameters).
    pub spec: VmSpec,
    /// Memory regions (their contents travel separately).
    pub regions: Vec<RegionLayout>,
    pub vcpus: Vec<VcpuState>,
    /// In-kernel PIC master, PIC slave and IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// kvmclock.
    pub clock: Option<kvm_clock_data>,
    pub devices: DeviceState,
}

impl VmState {
    /// Encode as described in the module docs.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let body = postcard::to_allocvec(self)?;
        let mut out = Vec::with_capacity(body.len() + 20);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        Ok(out)
    }

    /// Decode and check a blob made by [`VmState::encode`]. Never panics on arbitrary input.
    pub fn decode(buf: &[u8]) -> Result<VmState, StateError> {
        if buf.len() < 16 {
            return Err(StateError::Truncated("header"));
        }
        if buf[0..8] != STATE_MAGIC {
            return Err(StateError::Magic);
        }
        let word = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let version = word(8);
        if !(STATE_MIN_VERSION..=STATE_VERSION).contains(&version) {
            return Err(StateError::Version {
                found: version,
                min: STATE_MIN_VERSION,
                max: STATE_VERSION,
            });
        }
        let len = word(12) as usize;
        let end = 16usize
            .checked_add(len)
            .ok_or(StateError::Truncated("length"))?;
        if buf.len() < end + 4 {
            return Err(StateError::Truncated("body"));
        }
        let body = &buf[16..end];
        let expected = word(end);
        let found = crc32c::crc32c(body);
        if found != expected {
            return Err(StateError::Checksum { found, expected });
        }
        match version {
            1 => Ok(postcard::from_bytes::<VmStateV1>(body)?.into()),
            2 => Ok(postcard::from_bytes::<VmStateV2>(body)?.into()),
            _ => Ok(postcard::from_bytes(body)?),
        }
    }
}

/// Version 1 of [`VmSpec`]: no disks, NICs or CPU policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmSpecV1 {
    name: String,
    memory_mib: u64,
    vcpus: u32,
    kind: super::GuestKind,
}

/// Version 1 of [`VmState`] (still read).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmStateV1 {
    spec: VmSpecV1,
    regions: Vec<RegionLayout>,
    vcpus: Vec<VcpuState>,
    irqchips: Vec<kvm_irqchip>,
    clock: Option<kvm_clock_data>,
    devices: DeviceStateV2,
}

/// Version 2 of [`VmState`]: devices without virtio (still read).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmStateV2 {
    spec: VmSpec,
    regions: Vec<RegionLayout>,
    vcpus: Vec<VcpuState>,
    irqchips: Vec<kvm_irqchip>,
    clock: Option<kvm_clock_data>,
    devices: DeviceStateV2,
}

impl From<VmStateV2> for VmState {
    fn from(v: VmStateV2) -> VmState {
        VmState {
            spec: v.spec,
            regions: v.regions,
            vcpus: v.vcpus,
            irqchips: v.irqchips,
            clock: v.clock,
            devices: v.devices.into(),
        }
    }
}

impl From<VmStateV1> for VmState {
    fn from(v: VmStateV1) -> VmState {
        VmState {
            spec: VmSpec {
                name: v.spec.name,
                memory_mib: v.spec.memory_mib,
                vcpus: v.spec.vcpus,
                kind: v.spec.kind,
                disks: Vec::new(),
                nics: Vec::new(),
                cpu: Default::default(),
            },
            regions: v.regions,
            vcpus: v.vcpus,
            irqchips: v.irqchips,
            clock: v.clock,
            devices: v.devices.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{GuestKind, VmSpec};

    fn sample() -> VmState {
        VmState {
            spec: VmSpec {
                name: "t".into(),
                memory_mib: 64,
                vcpus: 1,
                kind: GuestKind::Workload(Default::default()),
                disks: vec![],
                nics: vec![],
                cpu: Default::default(),
            },
            regions: vec![RegionLayout {
                gpa: 0,
                size: 64 << 20,
            }],
            vcpus: vec![VcpuState {
                id: 0,
                cpuid: vec![kvm_cpuid_entry2 {
                    function: 1,
                    eax: 7,
                    ..Default::default()
                }],
                regs: kvm_regs {
                    rip: 0x8000,
                    rax: 42,
                    ..Default::default()
                },
                sregs: Default::default(),
                fpu: Default::default(),
                xsave: Some(Default::default()),
                xcrs: None,
                lapic: Default::default(),
                msrs: vec![kvm_msr_entry {
                    index: 0x10,
                    data: 123456,
                    ..Default::default()
                }],
                events: Default::default(),
                mp_state: Default::default(),
                debugregs: Default::default(),
                tsc_khz: Some(2_000_000),
            }],
            irqchips: vec![],
            clock: None,
            devices: DeviceState::default(),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let b = s.encode().unwrap();
        let d = VmState::decode(&b).unwrap();
        assert_eq!(d.vcpus[0].regs.rax, 42);
        assert_eq!(d.vcpus[0].msrs[0].data, 123456);
        assert_eq!(d.spec, s.spec);
        assert_eq!(d.encode().unwrap(), b);
    }

    #[test]
    fn previous_version_is_still_read() {
        let s = sample();
        let v1 = VmStateV1 {
            spec: VmSpecV1 {
                name: s.spec.name.clone(),
                memory_mib: s.spec.memory_mib,
                vcpus: s.spec.vcpus,
                kind: s.spec.kind.clone(),
            },
            regions: s.regions.clone(),
            vcpus: s.vcpus.clone(),
            irqchips: vec![],
            clock: None,
            devices: DeviceStateV2 {
                serial: s.devices.serial,
                console_tail: s.devices.console_tail.clone(),
            },
        };
        let body = postcard::to_allocvec(&v1).unwrap();
        let mut blob = Vec::new();
        blob.extend_from_slice(&STATE_MAGIC);
        blob.extend_from_slice(&1u32.to_le_bytes());
        blob.extend_from_slice(&(body.len() as u32).to_le_bytes());
        blob.extend_from_slice(&body);
        blob.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        let d = VmState::decode(&blob).unwrap();
        assert_eq!(d.spec, s.spec);
        assert_eq!(d.vcpus[0].regs.rax, 42);
    }

    #[test]
    fn version_2_is_still_read_and_virtio_state_round_trips() {
        let mut s = sample();
        let v2 = VmStateV2 {
            spec: s.spec.clone(),
            regions: s.regions.clone(),
            vcpus: s.vcpus.clone(),
            irqchips: vec![],
            clock: None,
            devices: DeviceStateV2 {
                serial: s.devices.serial,
                console_tail: b"hello".to_vec(),
            },
        };
        let body = postcard::to_allocvec(&v2).unwrap();
        let mut blob = Vec::new();
        blob.extend_from_slice(&STATE_MAGIC);
        blob.extend_from_slice(&2u32.to_le_bytes());
        blob.extend_from_slice(&(body.len() as u32).to_le_bytes());
        blob.extend_from_slice(&body);
        blob.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        let d = VmState::decode(&blob).unwrap();
        assert_eq!(d.devices.console_tail, b"hello");
        assert_eq!(d.devices.virtio, Default::default());
        // Version 3 carries the devices' state.
        s.devices.virtio.net.push(crate::vm::virtio::net::NetState {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            rx_frames: vec![vec![1, 2, 3]],
            ..Default::default()
        });
        s.devices.virtio.blk.push(crate::vm::virtio::blk::BlkState {
            capacity_sectors: 2048,
            ..Default::default()
        });
        let d = VmState::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(d.devices, s.devices);
    }

    #[test]
    fn rejects_damage_without_panicking() {
        let b = sample().encode().unwrap();
        assert!(matches!(
            VmState::decode(&b[..10]),
            Err(StateError::Truncated(_))
        ));
        let mut c = b.clone();
        c[0] = b'X';
        assert!(matches!(VmState::decode(&c), Err(StateError::Magic)));
        let mut c = b.clone();
        c[8] = 99;
        assert!(matches!(
            VmState::decode(&c),
            Err(StateError::Version { .. })
        ));
        let mut c = b.clone();
        let n = c.len();
        c[n - 10] ^= 0xff;
        assert!(matches!(
            VmState::decode(&c),
            Err(StateError::Checksum { .. })
        ));
        // Every truncation and a sweep of single-byte flips decode to errors, not panics.
        for cut in 0..b.len() {
            let _ = VmState::decode(&b[..cut]);
        }
        for i in (0..b.len()).step_by(7) {
            let mut c = b.clone();
            c[i] = c[i].wrapping_add(1);
            let _ = VmState::decode(&c);
        }
        let mut c = b.clone();
        c[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(VmState::decode(&c).is_err());
    }
}
