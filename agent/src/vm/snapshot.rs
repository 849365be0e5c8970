//! Saving a guest to a directory and bringing it back (`ferry vm save` / `ferry vm restore`).
//!
//! ## Directory format (version 1)
//!
//! ```text
//! DIR/vm.json                 manifest (below), human-readable
//! DIR/state.bin               VmState (see state.rs for its encoding)
//! DIR/mem-<gpa in hex>.raw    one file per memory region
//! ```
//!
//! Each memory file is the region's bytes as they are: byte offset = guest-physical address minus
//! the region's start, file size = region size. Pages that are all zero are holes (the file is
//! sparse), so `du` shows the memory in use and `ls` its size; `xxd -s`, `cmp` and `dd` read it
//! as is. The manifest:
//!
//! ```json
//! { "format": "ferry-vm-save", "version": 1, "name": "vm1",
//!   "spec": { ... }, "state_file": "state.bin",
//!   "regions": [ { "gpa": 0, "size": 1073741824, "file": "mem-0.raw", "nonzero_pages": 131072 } ] }
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::memory::{is_zero, GuestMemory, MemoryError, RegionLayout, PAGE_SIZE};
use super::state::{StateError, VmState};
use super::{Hypervisor, Vm, VmError, VmSpec, VmStatus};

pub const SAVE_FORMAT: &str = "ferry-vm-save";
pub const SAVE_VERSION: u32 = 1;

/// Errors saving or restoring a VM directory.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already holds a saved VM; choose an empty or new directory")]
    NotEmpty(PathBuf),
    #[error("{path} is not a Ferry save manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: StateError,
    },
    #[error("memory file {path} is {found} bytes, expected {expected}; the save is incomplete")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// One region in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestRegion {
    pub gpa: u64,
    pub size: u64,
    pub file: String,
    pub nonzero_pages: u64,
}

/// `vm.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub spec: VmSpec,
    pub state_file: String,
    pub regions: Vec<ManifestRegion>,
}

/// What a save wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaveReport {
    pub dir: PathBuf,
    pub memory_bytes: u64,
    pub nonzero_pages: u64,
    pub state_bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a paused VM to `dir` (created if missing; must not hold a save already).
pub fn save(vm: &Vm, dir: &Path) -> Result<SaveReport, SnapshotError> {
    let st = vm.status();
    if st == VmStatus::Running {
        return Err(VmError::State(st, "pause it before saving").into());
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let manifest_path = dir.join("vm.json");
    if manifest_path.exists() {
        return Err(SnapshotError::NotEmpty(dir.to_path_buf()));
    }
    let state = vm.capture_state()?;
    let blob = state.encode().map_err(|source| SnapshotError::State {
        path: dir.join("state.bin"),
        source,
    })?;
    let state_path = dir.join("state.bin");
    write_file(&state_path, &blob)?;

    let mem = vm.memory();
    let mut regions = Vec::new();
    let mut total_nonzero = 0;
    for (i, l) in mem.layout().iter().enumerate() {
        let name = format!("mem-{:x}.raw", l.gpa);
        let path = dir.join(&name);
        let nonzero = save_region(mem, i, *l, &path)?;
        total_nonzero += nonzero;
        regions.push(ManifestRegion {
            gpa: l.gpa,
            size: l.size,
            file: name,
            nonzero_pages: nonzero,
        });
    }
    let manifest = Manifest {
        format: SAVE_FORMAT.into(),
        version: SAVE_VERSION,
        name: vm.spec.name.clone(),
        spec: vm.spec.clone(),
        state_file: "state.bin".into(),
        regions,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::Manifest {
        path: manifest_path.clone(),
        reason: e.to_string(),
    })?;
    // The manifest goes last: a directory without one is an incomplete save.
    write_file(&manifest_path, &json)?;
    tracing::info!(vm = %vm.spec.name, dir = %dir.display(), nonzero_pages = total_nonzero, "vm saved");
    Ok(SaveReport {
        dir: dir.to_path_buf(),
        memory_bytes: mem.size(),
        nonzero_pages: total_nonzero,
        state_bytes: blob.len() as u64,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn save_region(
    mem: &GuestMemory,
    index: usize,
    l: RegionLayout,
    path: &Path,
) -> Result<u64, SnapshotError> {
    let f = File::create(path).map_err(io(path))?;
    f.set_len(l.size).map_err(io(path))?;
    // SAFETY: the VM is paused (checked by `save`) and the agent does not write guest memory
    // of a paused VM while saving it (the API serializes operations per VM).
    let bytes = unsafe { mem.region_slice(index) }.map_err(VmError::from)?;
    let ps = PAGE_SIZE as usize;
    let mut nonzero = 0u64;
    let mut run_start: Option<usize> = None;
    let flush = |from: usize, to: usize| -> Result<(), SnapshotError> {
        f.write_all_at(&bytes[from..to], from as u64)
            .map_err(io(path))
    };
    for (p, page) in bytes.chunks_exact(ps).enumerate() {
        let off = p * ps;
        if is_zero(page) {
            if let Some(s) = run_start.take() {
                flush(s, off)?;
            }
        } else {
            nonzero += 1;
            if run_start.is_none() {
                run_start = Some(off);
            }
            // Keep writes bounded (8 MiB).
            if let Some(s) = run_start {
                if off + ps - s >= 8 << 20 {
                    flush(s, off + ps)?;
                    run_start = None;
                }
            }
        }
    }
    if let Some(s) = run_start {
        flush(s, bytes.len())?;
    }
    f.sync_all().map_err(io(path))?;
    Ok(nonzero)
}

/// Read a save directory's manifest and state.
pub fn read(dir: &Path) -> Result<(Manifest, VmState), SnapshotError> {
    let manifest_path = dir.join("vm.json");
    let text = std::fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| SnapshotError::Manifest {
            path: manifest_path.clone(),
            reason: e.to_string(),
        })?;
    if manifest.format != SAVE_FORMAT || manifest.version != SAVE_VERSION {
        return Err(SnapshotError::Manifest {
            path: manifest_path,
            reason: format!(
                "format {:?} version {} (this build reads {SAVE_FORMAT:?} version {SAVE_VERSION})",
                manifest.format, manifest.version
            ),
        });
    }
    let state_path = dir.join(&manifest.state_file);
    let blob = std::fs::read(&state_path).map_err(io(&state_path))?;
    let state = VmState::decode(&blob).map_err(|source| SnapshotError::State {
        path: state_path.clone(),
        source,
    })?;
    let layout: Vec<RegionLayout> = manifest
        .regions
        .iter()
        .map(|r| RegionLayout {
            gpa: r.gpa,
            size: r.size,
        })
        .collect();
    if layout != state.regions {
        return Err(SnapshotError::Manifest {
            path: manifest_path,
            reason: "regions in vm.json and state.bin differ".into(),
        });
    }
    Ok((manifest, state))
}

/// Rebuild a VM from `dir`, paused; `rename` gives it another name.
pub fn restore(
    hv: &Hypervisor,
    dir: &Path,
    rename: Option<&str>,
    env: &super::DeviceEnv,
) -> Result<Vm, SnapshotError> {
    let (manifest, mut state) = read(dir)?;
    if let Some(n) = rename {
        state.spec.name = n.to_string();
    }
    let vm = Vm::create_for_restore_in(hv, &state, env)?;
    for (i, r) in manifest.regions.iter().enumerate() {
        let path = dir.join(&r.file);
        load_region(vm.memory(), i, r, &path)?;
    }
    vm.restore_state(&state)?;
    // Restored VMs are paused, ready to resume.
    if let Ok(mut s) = vm.status.lock() {
        *s = VmStatus::Paused;
    }
    tracing::info!(vm = %vm.spec.name, dir = %dir.display(), "vm restored");
    Ok(vm)
}

fn load_region(
    mem: &GuestMemory,
    _index: usize,
    r: &ManifestRegion,
    path: &Path,
) -> Result<(), SnapshotError> {
    let mut f = File::open(path).map_err(io(path))?;
    let len = f.metadata().map_err(io(path))?.len();
    if len != r.size {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            found: len,
            expected: r.size,
        });
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = seek_data(&f, pos).map_err(io(path))?;
        let Some(data) = data else { break };
        let hole = seek_hole(&f, data).map_err(io(path))?.min(len);
        let mut off = data;
        f.seek(SeekFrom::Start(off)).map_err(io(path))?;
        while off < hole {
            let n = ((hole - off) as usize).min(buf.len());
            f.read_exact(&mut buf[..n]).map_err(io(path))?;
            mem.write(r.gpa + off, &buf[..n]).map_err(VmError::from)?;
            off += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

fn seek_data(f: &File, from: u64) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an fd we own; no memory is involved.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as i64, libc::SEEK_DATA) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

fn seek_hole(f: &File, from: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an fd we own; no memory is involved.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as i64, libc::SEEK_HOLE) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// CRC-32C over all guest memory, region by region (compare two paused guests cheaply).
pub fn memory_digest(vm: &Vm) -> Result<String, VmError> {
    let st = vm.status();
    if st == VmStatus::Running {
        return Err(VmError::State(st, "pause it to take a memory digest"));
    }
    // SAFETY: the VM is not running (checked above) and the agent does not write it while
    // digesting (operations on a VM are serialized by the API).
    Ok(unsafe { digest_paused(vm.memory()) }?)
}

/// [`memory_digest`] of guest memory, whatever guest it belongs to.
///
/// # Safety
/// As for [`GuestMemory::region_slice`]: nothing may write the memory meanwhile (its guest is
/// paused or never ran, and the agent does not write it).
pub unsafe fn digest_paused(mem: &GuestMemory) -> Result<String, MemoryError> {
    let mut crc = 0u32;
    for i in 0..mem.layout().len() {
        // SAFETY: nothing writes the memory while the slice lives (this function's contract).
        let bytes = unsafe { mem.region_slice(i) }?;
        for chunk in bytes.chunks(1 << 20) {
            crc = crc32c::crc32c_append(crc, chunk);
        }
    }
    Ok(format!("crc32c:{crc:08x}"))
}

/// Capture a paused VM and rebuild it in-process as a new, paused VM named `name`: state and
/// memory (non-zero pages only, so the copy stays sparse).
pub fn clone_paused(hv: &Hypervisor, vm: &Vm, name: &str) -> Result<Vm, VmError> {
    let mut state = vm.capture_state()?;
    state.spec.name = name.to_string();
    let copy = Vm::create_for_restore(hv, &state)?;
    copy_memory(vm.memory(), copy.memory())?;
    copy.restore_state(&state)?;
    if let Ok(mut s) = copy.status.lock() {
        *s = VmStatus::Paused;
    }
    Ok(copy)
}

/// Copy every non-zero page of `from` into `to` (same layout; both guests not running).
pub fn copy_memory(from: &GuestMemory, to: &GuestMemory) -> Result<(), VmError> {
    if from.layout() != to.layout() {
        return Err(VmError::Mismatch("memory layouts differ".into()));
    }
    for (i, l) in from.layout().iter().enumerate() {
        // SAFETY: the source guest is paused (callers' contract) and the agent does not write
        // it while copying.
        let src = unsafe { from.region_slice(i) }?;
        for (p, page) in src.chunks_exact(PAGE_SIZE as usize).enumerate() {
            if !is_zero(page) {
                to.write(l.gpa + p as u64 * PAGE_SIZE, page)?;
            }
        }
    }
    Ok(())
}
