//! The `raw` guest kind: a flat binary image loaded at a guest-physical address and started in
//! 16-bit real mode at `cs:ip` (a boot sector at 0x7c00 by default). The serial port at 0x3f8 is
//! its console. Only the first vCPU starts; others wait for INIT/SIPI as on real hardware.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::memory::{GuestMemory, MemoryError};
use super::BootVcpu;

/// Parameters of a raw image guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParams {
    /// Path of the image on the agent's host.
    pub image: PathBuf,
    /// Guest-physical load address.
    #[serde(default = "default_load")]
    pub load_addr: u64,
    /// Real-mode code segment at entry.
    #[serde(default)]
    pub cs: u16,
    /// Real-mode instruction pointer at entry.
    #[serde(default = "default_ip")]
    pub ip: u16,
}

fn default_load() -> u64 {
    0x7c00
}
fn default_ip() -> u16 {
    0x7c00
}

impl RawParams {
    pub fn new(image: PathBuf) -> Self {
        RawParams {
            image,
            load_addr: default_load(),
            cs: 0,
            ip: default_ip(),
        }
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
    #[error("image {0} is empty")]
    Empty(PathBuf),
    #[error(transparent)]
    Memory(#[from] MemoryError),
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
    let low_end = memory_bytes.min(super::memory::LOW_MEMORY_END);
    let room = low_end.saturating_sub(p.load_addr);
    if size > room {
        return Err(RawError::TooLarge {
            path: p.image.clone(),
            size,
            room,
            load: p.load_addr,
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
    let room = mem
        .size()
        .min(super::memory::LOW_MEMORY_END)
        .saturating_sub(p.load_addr);
    if bytes.len() as u64 > room {
        return Err(RawError::TooLarge {
            path: p.image.clone(),
            size: bytes.len() as u64,
            room,
            load: p.load_addr,
        });
    }
    mem.write(p.load_addr, &bytes)?;
    let mut boots = vec![BootVcpu::RealMode {
        cs: p.cs,
        ip: p.ip,
        sp: 0x7c00,
    }];
    boots.extend((1..vcpus).map(|_| BootVcpu::Waiting));
    Ok(boots)
}
