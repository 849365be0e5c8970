//! The `ferry` binary a lab starts its agents from.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The `ferry` binary: `$FERRY_BIN` if set, else `ferry` in the cargo profile directory of the
/// current executable (`target/<profile>/`, also from test binaries in `target/<profile>/deps/`).
pub fn ferry_bin() -> Result<PathBuf> {
    if let Some(value) = std::env::var_os("FERRY_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(value);
        if !bin.is_file() {
            bail!(
                "FERRY_BIN={} is not a file: build the agent with `cargo build -p ferry-cli` and point \
                 FERRY_BIN at target/<profile>/ferry, or unset FERRY_BIN",
                bin.display()
            );
        }
        return Ok(bin);
    }
    let exe = std::env::current_exe().context(
        "cannot locate the current executable to find `ferry` next to it: set FERRY_BIN",
    )?;
    let dir = profile_dir(&exe).ok_or_else(|| {
        anyhow!(
            "cannot tell the cargo profile directory of {}: set FERRY_BIN",
            exe.display()
        )
    })?;
    let bin = dir.join("ferry");
    if !bin.is_file() {
        bail!(
            "the ferry binary {} does not exist: run `cargo build -p ferry-cli` (same profile and \
             CARGO_TARGET_DIR as this build) or set FERRY_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// `target/<profile>` for an executable in it or in its `deps/` or `examples/`.
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => dir.parent().map(Path::to_path_buf),
        _ => Some(dir.to_path_buf()),
    }
}

pub(super) fn resolve_ferry_bin(bin: &Path) -> Result<PathBuf> {
    let abs = fs::canonicalize(bin).with_context(|| {
        format!(
            "ferry binary {} not found: run `cargo build -p ferry-cli` or pass the right path",
            bin.display()
        )
    })?;
    if !abs.is_file() {
        bail!(
            "ferry binary {} is not a file: pass the path of the built `ferry` executable",
            abs.display()
        );
    }
    Ok(abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_of_binaries_and_tests() {
        assert_eq!(
            profile_dir(Path::new("/t/debug/xtask")),
            Some(PathBuf::from("/t/debug"))
        );
        assert_eq!(
            profile_dir(Path::new("/t/release/deps/lab-0123abcd")),
            Some(PathBuf::from("/t/release"))
        );
        assert_eq!(
            profile_dir(Path::new("/t/debug/examples/x")),
            Some(PathBuf::from("/t/debug"))
        );
    }
}
