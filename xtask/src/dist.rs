//! `cargo xtask dist`: a release build packaged for deployment, and the check of the systemd
//! unit that CI runs (`systemd-analyze verify`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;

use crate::dev::workspace_root;

const UNIT: &str = "ferry-agent.service";

/// Man pages (one per subcommand) and shell completions for `ferry`, generated from its clap
/// definitions, under `root` (`usr/share/...`).
pub fn docs(root: &Path) -> Result<()> {
    let cmd = ferry::cli::Cli::command();
    let man = root.join("usr/share/man/man1");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man).context("cannot write the man pages")?;
    for (shell, dir, file) in [
        (
            clap_complete::Shell::Bash,
            "usr/share/bash-completion/completions",
            "ferry",
        ),
        (
            clap_complete::Shell::Zsh,
            "usr/share/zsh/site-functions",
            "_ferry",
        ),
        (
            clap_complete::Shell::Fish,
            "usr/share/fish/vendor_completions.d",
            "ferry.fish",
        ),
    ] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d)?;
        let mut f = std::fs::File::create(d.join(file))?;
        clap_complete::generate(shell, &mut cmd.clone(), "ferry", &mut f);
    }
    Ok(())
}

/// `systemd-analyze verify` of the unit, with `ExecStart` pointing at `bin` and the man pages
/// from `man_root` (so the `Documentation=man:ferry(1)` link is checked too).
pub fn verify_unit(bin: &Path, man_root: &Path) -> Result<()> {
    let text = std::fs::read_to_string(workspace_root().join("dist").join(UNIT))?;
    let dir = std::env::temp_dir().join(format!("ferry-unit-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let unit = dir.join(UNIT);
    std::fs::write(
        &unit,
        text.replace("/usr/bin/ferry", &bin.display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", man_root.join("usr/share/man"))
        .output()
        .context("cannot run systemd-analyze (Debian package systemd; `cargo xtask deps`)")?;
    let _ = std::fs::remove_dir_all(&dir);
    let msg =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !msg.trim().is_empty() {
        bail!("systemd-analyze verify {UNIT}:\n{msg}");
    }
    println!("dist/{UNIT}: systemd-analyze verify passed");
    Ok(())
}

/// Build the release binary and package it: `target/dist/ferry-VERSION-x86_64-linux.tar.gz`.
pub fn dist() -> Result<PathBuf> {
    let root = workspace_root();
    crate::dev::run(Command::new(env!("CARGO")).args(["build", "--release", "-p", "ferry"]))?;
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("ferry-{version}-x86_64-linux");
    let out = root.join("target/dist");
    let stage = out.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let copy = |from: PathBuf, to: &str, mode: u32| -> Result<()> {
        let dst = stage.join(to);
        std::fs::create_dir_all(dst.parent().context("path")?)?;
        std::fs::copy(&from, &dst).with_context(|| format!("cannot copy {}", from.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    copy(root.join("target/release/ferry"), "usr/bin/ferry", 0o755)?;
    copy(
        root.join("dist").join(UNIT),
        "lib/systemd/system/ferry-agent.service",
        0o644,
    )?;
    copy(root.join("dist/agent.toml"), "etc/ferry/agent.toml", 0o640)?;
    copy(
        root.join("dist/INSTALL.md"),
        "usr/share/doc/ferry/INSTALL.md",
        0o644,
    )?;
    copy(
        root.join("README.md"),
        "usr/share/doc/ferry/README.md",
        0o644,
    )?;
    docs(&stage)?;
    verify_unit(&stage.join("usr/bin/ferry"), &stage)?;
    let tarball = out.join(format!("{name}.tar.gz"));
    crate::dev::run(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("--owner=0")
            .arg("--group=0")
            .arg("-C")
            .arg(&stage)
            .args(["usr", "lib", "etc"]),
    )?;
    println!("{}", tarball.display());
    Ok(tarball)
}
