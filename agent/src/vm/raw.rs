//! The `raw` guest kind: a flat binary image loaded at a guest-physical address and started in
//! 16-bit real mode at `cs:ip` (a boot sector at 0x7c00 by default). The serial port at 0x3f8 is
//! its console. Only the first vCPU starts; others wait for INIT/SIPI as on real hardware.
//!
//! With `mode = "long-user"` the image instead starts at its load address (default 4 MiB) in
//! 64-bit long mode at CPL3, on the same scaffolding as the workload guest (identity-mapped
//! memory, every I/O port allowed, no IDT): the way to run custom code at native speed on a
//! paravirtual KVM where real mode is emulated.
//!
//! Like the workload guest, a raw guest may yield to the host: `out 0xf0, eax` sleeps for `eax`
//! TSC cycles (at least 2 ms, at most 20 ms), waking early for a pause.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::memory::{GuestMemory, MemoryError};
use super::BootVcpu;

/// How a raw image starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RawMode {
    /// 16-bit real mode at `cs:ip`.
    #[default]
    Real,
    /// 64-bit long mode at CPL3, entered at the load address.
    LongUser,
}

/// Parameters of a raw image guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParams {
    /// Path of the image on the agent's host.
    pub image: PathBuf,
    #[serde(default)]
    pub mode: RawMode,
    /// Guest-physical load address (default 0x7c00 in real mode, 4 MiB in long-user mode).
    #[serde(default)]
    pub load_addr: Option<u64>,
    /// Real-mode code segment at entry.
    #[serde(default)]
    pub cs: u16,
    /// Real-mode instruction pointer at entry.
    #[serde(default = "default_ip")]
    pub ip: u16,
}

fn default_ip() -> u16 {
    0x7c00
}

impl RawParams {
    pub fn new(image: PathBuf) -> Self {
        RawParams {
            image,
            mode: RawMode::Real,
            load_addr: None,
            cs: 0,
            ip: default_ip(),
        }
    }

    /// Where the image goes.
    pub fn load_addr(&self) -> u64 {
        self.load_addr.unwrap_or(match self.mode {
            RawMode::Real => 0x7c00,
            RawMode::LongUser => LONG_USER_LOAD,
        })
    }
}

/// Errors loading a raw image.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("cannot read image {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path} is {size} bytes but only {room} bytes fit between load address {load:#x} and the end of guest memory; give the VM more memory or load it lower")]
    TooLarge {
        path: PathBuf,
        size: u64,
        room: u64,
        load: u64,
    },
    #[error("a long-user image must load at or above {min:#x} (above the page tables), not at {load:#x}")]
    LoadTooLow { load: u64, min: u64 },
    #[error("image {0} is empty")]
    Empty(PathBuf),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Default load address in long-user mode: above the scaffolding for up to 496 GiB.
pub const LONG_USER_LOAD: u64 = 0x40_0000;
const LONG_USER_STACK: u64 = 0x8000;

fn room(p: &RawParams, memory_bytes: u64) -> u64 {
    // The image must sit in the first region (below 3 GiB).
    memory_bytes
        .min(super::memory::LOW_MEMORY_END)
        .saturating_sub(p.load_addr())
}

/// Check that an image file fits, without loading it.
pub fn check(p: &RawParams, memory_bytes: u64) -> Result<u64, RawError> {
    let size = std::fs::metadata(&p.image)
        .map_err(|source| RawError::Read {
            path: p.image.clone(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(RawError::Empty(p.image.clone()));
    }
    let load = p.load_addr();
    if p.mode == RawMode::LongUser && load < LONG_USER_LOAD {
        return Err(RawError::LoadTooLow {
            load,
            min: LONG_USER_LOAD,
        });
    }
    let room = room(p, memory_bytes);
    if size > room {
        return Err(RawError::TooLarge {
            path: p.image.clone(),
            size,
            room,
            load,
        });
    }
    Ok(size)
}

/// Load the image; vCPU 0 starts at `cs:ip`, the rest wait.
pub fn load(mem: &GuestMemory, vcpus: u32, p: &RawParams) -> Result<Vec<BootVcpu>, RawError> {
    check(p, mem.size())?;
    let bytes = std::fs::read(&p.image).map_err(|source| RawError::Read {
        path: p.image.clone(),
        source,
    })?;
    // `check` ran on the metadata; the file may have changed since, so check the bytes too.
    let room = room(p, mem.size());
    if bytes.len() as u64 > room {
        return Err(RawError::TooLarge {
            path: p.image.clone(),
            size: bytes.len() as u64,
            room,
            load: p.load_addr(),
        });
    }
    mem.write(p.load_addr(), &bytes)?;
    let first = match p.mode {
        RawMode::Real => BootVcpu::RealMode {
            cs: p.cs,
            ip: p.ip,
            sp: 0x7c00,
        },
        RawMode::LongUser => {
            super::x86::write_scaffolding(mem, super::x86::max_gpa(&mem.layout()))?;
            BootVcpu::LongModeUser {
                rip: p.load_addr(),
                rsp: LONG_USER_STACK,
                rdi: 0,
                rsi: 0,
            }
        }
    };
    let mut boots = vec![first];
    boots.extend((1..vcpus).map(|_| BootVcpu::Waiting));
    Ok(boots)
}

/// A tiny real-mode boot sector (load at 0x7c00) that prints `msg` on COM1 and halts: the
/// smallest useful raw guest (demo and tests). `msg` must fit in the 512-byte sector.
pub fn hello_image(msg: &str) -> Vec<u8> {
    let mut code = vec![
        0xbe, 0x10, 0x7c, // mov si, 0x7c10 (the message)
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xac, // next: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp next
        0xfa, 0xf4, // done: cli; hlt
    ];
    code.extend(msg.bytes().filter(|&b| b != 0).take(512 - 17));
    code.push(0);
    code
}
