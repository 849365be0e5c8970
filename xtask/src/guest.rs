//! `build-guest`: build the service guest (`guest/`, a `no_std` program in its own workspace)
//! into the committed flat image `guest/ferry-guest.bin`; with `--check`, build into a temporary
//! file and fail if the committed image differs (as `build-ebpf` does for the BPF object).
//!
//! The build is reproducible: explicit `--target x86_64-unknown-linux-gnu` (so the flags below
//! reach only the guest, never build scripts), `--locked` against `guest/Cargo.lock`, one
//! codegen unit and LTO (guest/Cargo.toml's release profile), static relocation, no build id,
//! paths of the checkout and of the cargo home remapped, and the flat image taken from the ELF's
//! loadable segments only (no symbols, no notes). Two checkouts in different directories give
//! the same bytes.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::dev::workspace_root;

/// Where the image is loaded and entered (`ferry_guest_abi::PROGRAM_ADDR`).
const LOAD_ADDR: u64 = 0x40_0000;
/// The guest's heap starts here (`ferry_guest_abi::HEAP_START`): the image must end below it.
const IMAGE_END: u64 = 0x100_0000;
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn guest_dir() -> PathBuf {
    workspace_root().join("guest")
}

/// The committed image.
pub fn guest_image() -> PathBuf {
    guest_dir().join("ferry-guest.bin")
}

/// `cargo xtask build-guest [--check]`.
pub fn build_guest(check: bool) -> Result<()> {
    let committed = guest_image();
    let image = build()?;
    if !check {
        std::fs::write(&committed, &image)
            .with_context(|| format!("writing {}", committed.display()))?;
        println!("built {} ({} bytes)", committed.display(), image.len());
        return Ok(());
    }
    let old = std::fs::read(&committed).with_context(|| {
        format!(
            "reading {}: run `cargo xtask build-guest` and commit the image",
            committed.display()
        )
    })?;
    if old != image {
        bail!(
            "guest/ferry-guest.bin is stale: it does not match a fresh build of guest/ ({} bytes committed, {} built); run `cargo xtask build-guest` and commit the image",
            old.len(),
            image.len()
        );
    }
    println!("guest/ferry-guest.bin matches its source");
    Ok(())
}

/// Build the guest and return its flat image.
pub fn build() -> Result<Vec<u8>> {
    let dir = guest_dir();
    let target_dir = dir.join("target");
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let flags = [
        "-Crelocation-model=static".to_string(),
        "-Ccodegen-units=1".into(),
        "-Cdebuginfo=0".into(),
        "-Clink-arg=-nostartfiles".into(),
        "-Clink-arg=-nostdlib".into(),
        "-Clink-arg=-static".into(),
        "-Clink-arg=-Wl,--build-id=none".into(),
        format!("-Clink-arg=-T{}", dir.join("link.ld").display()),
        format!("--remap-path-prefix={}=/ferry", workspace_root().display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
    ];
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(&dir)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    crate::dev::run(&mut cmd).context(
        "building the service guest failed (guest/; crates come from crates.io through cargo's usual cache)",
    )?;
    let elf_path = target_dir.join(TARGET).join("release").join("ferry-guest");
    let elf =
        std::fs::read(&elf_path).with_context(|| format!("reading {}", elf_path.display()))?;
    flat_image(&elf).with_context(|| format!("making a flat image of {}", elf_path.display()))
}

/// The bytes of an ELF executable's loadable segments laid out from `LOAD_ADDR` (what
/// `objcopy -O binary` gives), after checking it is entered at its first byte and fits below
/// the heap.
pub fn flat_image(elf: &[u8]) -> Result<Vec<u8>> {
    let u16_at = |o: usize| -> Result<u64> {
        Ok(u16::from_le_bytes(elf.get(o..o + 2).context("truncated ELF")?.try_into()?) as u64)
    };
    let u32_at = |o: usize| -> Result<u64> {
        Ok(u32::from_le_bytes(elf.get(o..o + 4).context("truncated ELF")?.try_into()?) as u64)
    };
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(o..o + 8).context("truncated ELF")?.try_into()?,
        ))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("not a 64-bit ELF file");
    }
    let entry = u64_at(0x18)?;
    if entry != LOAD_ADDR {
        bail!(
            "entry point is {entry:#x}, not {LOAD_ADDR:#x}: _start must come first (guest/link.ld)"
        );
    }
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    let mut segments = Vec::new();
    for i in 0..phnum {
        let p = phoff + i * phentsize;
        if u32_at(p)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, vaddr, filesz) = (u64_at(p + 8)?, u64_at(p + 16)?, u64_at(p + 32)?);
        if filesz == 0 {
            continue;
        }
        segments.push((vaddr, offset as usize, filesz as usize));
    }
    let Some(start) = segments.iter().map(|s| s.0).min() else {
        bail!("no loadable segments");
    };
    if start != LOAD_ADDR {
        bail!("first segment at {start:#x}, not {LOAD_ADDR:#x}");
    }
    let end = segments
        .iter()
        .map(|s| s.0 + s.2 as u64)
        .max()
        .unwrap_or(start);
    if end > IMAGE_END {
        bail!("the image ends at {end:#x}, past the heap at {IMAGE_END:#x}");
    }
    let mut out = vec![0u8; (end - start) as usize];
    for (vaddr, offset, size) in segments {
        let src = elf
            .get(offset..offset + size)
            .context("segment outside the file")?;
        let at = (vaddr - start) as usize;
        out[at..at + size].copy_from_slice(src);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(entry: u64, segs: &[(u64, &[u8])]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56 * segs.len()];
        e[..5].copy_from_slice(b"\x7fELF\x02");
        e[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, (vaddr, data)) in segs.iter().enumerate() {
            let off = e.len() as u64;
            let p = 64 + 56 * i;
            e[p..p + 4].copy_from_slice(&1u32.to_le_bytes());
            e[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            e[p + 16..p + 24].copy_from_slice(&vaddr.to_le_bytes());
            e[p + 32..p + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            e.extend_from_slice(data);
        }
        e
    }

    #[test]
    fn flat_image_lays_out_segments_from_the_load_address() {
        let e = elf(LOAD_ADDR, &[(LOAD_ADDR, b"abc"), (LOAD_ADDR + 8, b"xy")]);
        assert_eq!(flat_image(&e).unwrap(), b"abc\0\0\0\0\0xy");
        let err = flat_image(&elf(LOAD_ADDR + 1, &[(LOAD_ADDR, b"a")])).unwrap_err();
        assert!(err.to_string().contains("entry point"), "{err}");
        let err = flat_image(&elf(LOAD_ADDR, &[(IMAGE_END, b"a"), (LOAD_ADDR, b"b")])).unwrap_err();
        assert!(err.to_string().contains("past the heap"), "{err}");
        assert!(flat_image(b"not an elf").is_err());
        assert!(flat_image(&elf(LOAD_ADDR, &[])).is_err());
    }
}
