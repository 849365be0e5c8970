//! The `service` guest kind: a `#![no_std]` Rust program (`guest/`) at CPL3 in long mode that
//! drives a virtio NIC and a virtio disk and serves ICMP/UDP/TCP echo, a TCP counter stream and a
//! disk journal (see `ferry_guest_abi` for the contract).
//!
//! Loading: the program goes to `PROGRAM_ADDR`, [`BootInfo`] to `BOOT_INFO_ADDR`, the long-mode
//! scaffolding maps at least the first 4 GiB (so the virtio-mmio windows at `0xd000_0000` are
//! reachable), and vCPU 0 starts at the program with `rsp = HEAP_END`, `rdi = BOOT_INFO_ADDR`.
//! Other vCPUs wait (the program is single-threaded).
//!
//! The program is embedded at build time (`agent/build.rs`), or read from `program` if given.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ferry_guest_abi as abi;
use serde::{Deserialize, Serialize};

use super::memory::{GuestMemory, MemoryError, LOW_MEMORY_END};
use super::{parse_mac, BootVcpu, VmSpec};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/guest_image.rs"));
}

/// Most journal records per second a guest may be asked for.
pub const MAX_JOURNAL_RATE: u32 = 10_000;
/// Most MiB/s of dirtying a guest may be asked for.
pub const MAX_DIRTY_RATE_MIB: u32 = 8_192;

/// Parameters of a service guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceParams {
    /// The guest's IPv4 address and prefix length.
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// Default gateway (none: only the local subnet is reachable).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Journal records appended (and flushed) per second; 0 = no journal.
    #[serde(default)]
    pub journal_rate: u32,
    /// Working set the guest keeps dirtying, MiB, and the rate, MiB/s (0 = idle).
    #[serde(default)]
    pub working_set_mib: u32,
    #[serde(default)]
    pub dirty_rate_mib: u32,
    /// The program image on the agent's host; None = the one built into the agent.
    #[serde(default)]
    pub program: Option<PathBuf>,
}

impl ServiceParams {
    pub fn new(ip: Ipv4Addr, prefix_len: u8) -> Self {
        ServiceParams {
            ip,
            prefix_len,
            gateway: None,
            journal_rate: 0,
            working_set_mib: 0,
            dirty_rate_mib: 0,
            program: None,
        }
    }
}

/// Errors of the service guest kind.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("this build has no service guest program (guest/ferry-guest.bin was missing when the agent was built); build the guest and rebuild the agent, or give the program's path")]
    NoProgram,
    #[error("cannot read the service guest program {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the service guest program is {size} bytes but at most {room} fit below the heap")]
    TooLarge { size: u64, room: u64 },
    #[error("service guest: {0}")]
    Invalid(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn invalid(s: impl Into<String>) -> ServiceError {
    ServiceError::Invalid(s.into())
}

/// The subnet mask of a prefix length.
fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Where guest memory below the MMIO hole ends.
fn low_end(spec: &VmSpec) -> u64 {
    (spec.memory_mib << 20).min(LOW_MEMORY_END)
}

impl ServiceParams {
    /// Checks that need no host.
    pub fn validate(&self, spec: &VmSpec) -> Result<(), ServiceError> {
        if !(1..=30).contains(&self.prefix_len) {
            return Err(invalid(format!(
                "prefix length /{} is not usable; give the address as A.B.C.D/N with N from 1 to 30 (e.g. 198.18.2.10/24)",
                self.prefix_len
            )));
        }
        let ip = u32::from(self.ip);
        let m = mask(self.prefix_len);
        if self.ip.is_unspecified()
            || self.ip.is_multicast()
            || self.ip.is_broadcast()
            || self.ip.is_loopback()
            || ip & !m == 0
            || ip & !m == !m
        {
            return Err(invalid(format!(
                "{}/{} is not a usable host address (network, broadcast, loopback or multicast)",
                self.ip, self.prefix_len
            )));
        }
        if let Some(g) = self.gateway {
            if u32::from(g) & m != ip & m || g == self.ip {
                return Err(invalid(format!(
                    "gateway {g} is not another address in {}/{}",
                    self.ip, self.prefix_len
                )));
            }
        }
        if self.journal_rate > MAX_JOURNAL_RATE {
            return Err(invalid(format!(
                "journal rate {} records/s is more than {MAX_JOURNAL_RATE}",
                self.journal_rate
            )));
        }
        if self.journal_rate > 0 && spec.disks.is_empty() {
            return Err(invalid(
                "a journal needs a disk: add --disk \"[datastore] dir/file.img:SIZE\" or set the journal rate to 0",
            ));
        }
        if self.dirty_rate_mib > MAX_DIRTY_RATE_MIB {
            return Err(invalid(format!(
                "dirty rate {} MiB/s is more than {MAX_DIRTY_RATE_MIB}",
                self.dirty_rate_mib
            )));
        }
        if self.dirty_rate_mib > 0 && self.working_set_mib == 0 {
            return Err(invalid("a dirty rate needs a working set (--working-set)"));
        }
        if spec.memory_mib << 20 < abi::MIN_MEMORY {
            return Err(invalid(format!(
                "a service guest needs at least {} MiB of memory, not {}",
                abi::MIN_MEMORY >> 20,
                spec.memory_mib
            )));
        }
        let room = low_end(spec).saturating_sub(abi::WORKING_SET_START) >> 20;
        if u64::from(self.working_set_mib) > room {
            return Err(invalid(format!(
                "working set of {} MiB does not fit: {} MiB of memory leave {room} MiB for it",
                self.working_set_mib, spec.memory_mib
            )));
        }
        if spec.nics.len() > 1 || spec.disks.len() > 1 {
            return Err(invalid(format!(
                "the service guest drives one NIC and one disk, not {} and {}",
                spec.nics.len(),
                spec.disks.len()
            )));
        }
        Ok(())
    }

    /// The program's bytes: the given file, or the embedded image.
    pub fn program(&self) -> Result<Vec<u8>, ServiceError> {
        let bytes = match &self.program {
            Some(p) => std::fs::read(p).map_err(|source| ServiceError::Read {
                path: p.clone(),
                source,
            })?,
            None => embedded::IMAGE.to_vec(),
        };
        if bytes.is_empty() {
            return Err(match &self.program {
                Some(p) => ServiceError::Read {
                    path: p.clone(),
                    source: std::io::Error::other("the file is empty"),
                },
                None => ServiceError::NoProgram,
            });
        }
        let room = abi::HEAP_START - abi::PROGRAM_ADDR;
        if bytes.len() as u64 > room {
            return Err(ServiceError::TooLarge {
                size: bytes.len() as u64,
                room,
            });
        }
        Ok(bytes)
    }
}

/// Whether this build carries a service guest program.
pub fn has_embedded_program() -> bool {
    !embedded::IMAGE.is_empty()
}

/// The boot information for `spec`.
pub fn boot_info(spec: &VmSpec, p: &ServiceParams, tsc_khz: u32) -> abi::BootInfo {
    let mac = spec
        .nics
        .first()
        .and_then(|n| parse_mac(&n.mac))
        .unwrap_or([0; 6]);
    abi::BootInfo {
        magic: abi::BOOT_MAGIC,
        version: abi::BOOT_VERSION,
        size: abi::BootInfo::SIZE as u32,
        tsc_khz: u64::from(tsc_khz),
        low_memory_end: low_end(spec),
        ipv4: p.ip.octets(),
        prefix_len: p.prefix_len,
        _pad0: [0; 3],
        gateway: p.gateway.map_or([0; 4], |g| g.octets()),
        mac,
        _pad1: [0; 6],
        net_mmio: if spec.nics.is_empty() {
            0
        } else {
            abi::MMIO_BASE + super::virtio::net_slot(0) * abi::MMIO_STRIDE
        },
        blk_mmio: if spec.disks.is_empty() {
            0
        } else {
            abi::MMIO_BASE + super::virtio::blk_slot(0) * abi::MMIO_STRIDE
        },
        journal_rate: p.journal_rate,
        working_set_mib: p.working_set_mib,
        dirty_rate_mib: p.dirty_rate_mib,
        _pad2: 0,
    }
}

/// Load the program, the boot information and the scaffolding; vCPU 0 starts, others wait.
pub fn load(
    mem: &GuestMemory,
    spec: &VmSpec,
    p: &ServiceParams,
    tsc_khz: u32,
) -> Result<Vec<BootVcpu>, ServiceError> {
    p.validate(spec)?;
    let program = p.program()?;
    mem.write(abi::PROGRAM_ADDR, &program)?;
    mem.write(abi::BOOT_INFO_ADDR, &boot_info(spec, p, tsc_khz).to_bytes())?;
    // Map at least 4 GiB: the MMIO windows sit below it.
    let map = super::x86::max_gpa(&mem.layout()).max(4 << 30);
    super::x86::write_scaffolding(mem, map)?;
    let mut boots = vec![BootVcpu::LongModeUser {
        rip: abi::PROGRAM_ADDR,
        rsp: abi::HEAP_END,
        rdi: abi::BOOT_INFO_ADDR,
        rsi: 0,
    }];
    boots.extend((1..spec.vcpus).map(|_| BootVcpu::Waiting));
    Ok(boots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{DiskSpec, GuestKind, NicSpec};

    fn spec(p: &ServiceParams) -> VmSpec {
        VmSpec {
            name: "s".into(),
            memory_mib: 256,
            vcpus: 1,
            kind: GuestKind::Service(p.clone()),
            disks: vec![DiskSpec {
                path: "[shared] s/disk.img".into(),
                size_mib: 16,
            }],
            nics: vec![NicSpec {
                mac: "52:54:00:01:02:03".into(),
                port_group: "vm-net".into(),
            }],
            cpu: Default::default(),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = ServiceParams {
            journal_rate: 200,
            working_set_mib: 64,
            dirty_rate_mib: 16,
            gateway: Some(Ipv4Addr::new(198, 18, 2, 1)),
            ..ServiceParams::new(Ipv4Addr::new(198, 18, 2, 10), 24)
        };
        ok.validate(&spec(&ok)).unwrap();
        let bad = |f: &dyn Fn(&mut ServiceParams, &mut VmSpec), needle: &str| {
            let mut p = ok.clone();
            let mut s = spec(&ok);
            f(&mut p, &mut s);
            let e = p.validate(&s).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        };
        bad(&|p, _| p.prefix_len = 0, "prefix length");
        bad(&|p, _| p.prefix_len = 32, "prefix length");
        bad(
            &|p, _| p.ip = Ipv4Addr::new(198, 18, 2, 0),
            "not a usable host",
        );
        bad(
            &|p, _| p.ip = Ipv4Addr::new(198, 18, 2, 255),
            "not a usable host",
        );
        bad(
            &|p, _| p.gateway = Some(Ipv4Addr::new(10, 0, 0, 1)),
            "gateway",
        );
        bad(&|p, _| p.journal_rate = 1_000_000, "journal rate");
        bad(&|_, s| s.disks.clear(), "needs a disk");
        bad(&|p, _| p.working_set_mib = 0, "needs a working set");
        bad(&|p, _| p.working_set_mib = 250, "does not fit");
        bad(&|_, s| s.memory_mib = 32, "at least 64 MiB");
        bad(&|p, _| p.dirty_rate_mib = 100_000, "dirty rate");
        bad(&|_, s| s.nics.push(s.nics[0].clone()), "one NIC");
    }

    #[test]
    fn boot_info_describes_the_guest() {
        let p = ServiceParams {
            journal_rate: 200,
            ..ServiceParams::new(Ipv4Addr::new(198, 18, 2, 10), 24)
        };
        let b = boot_info(&spec(&p), &p, 2_000_000);
        let back = abi::BootInfo::from_bytes(&b.to_bytes()).unwrap();
        assert_eq!(back.ipv4, [198, 18, 2, 10]);
        assert_eq!(back.prefix_len, 24);
        assert_eq!(back.mac, [0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(back.net_mmio, 0xd000_0000);
        assert_eq!(back.blk_mmio, 0xd000_1000);
        assert_eq!(back.low_memory_end, 256 << 20);
        assert_eq!(back.journal_rate, 200);
    }

    #[test]
    fn program_from_a_path_or_a_clear_error() {
        let mut p = ServiceParams::new(Ipv4Addr::new(198, 18, 2, 10), 24);
        p.program = Some("/nonexistent/ferry-guest.bin".into());
        assert!(p.program().unwrap_err().to_string().contains("cannot read"));
        p.program = None;
        match p.program() {
            Ok(b) => assert!(has_embedded_program() && !b.is_empty()),
            Err(e) => {
                assert!(!has_embedded_program());
                assert!(e.to_string().contains("no service guest program"));
            }
        }
    }
}
