//! The package itself: what it ships (`dpkg-deb --contents`, its conffiles) and what lintian
//! says about it.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};

use super::command::bounded_status;

/// lintian warnings the package keeps on purpose, each explained in docs/operations.md
/// ("The package and lintian"). Today none: lintian reports no error or warning (its two
/// info-level tags are explained there).
const LINTIAN_EXPLAINED: &[&str] = &[];

/// The package holds only `usr/` and `etc/` paths (nothing that could replace /lib, /bin or
/// /sbin on a merged-/usr host), and the files the issue asks for.
pub(super) fn check_contents(deb: &Path) -> Result<()> {
    let out = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(deb)
        .output()?;
    ensure!(out.status.success(), "dpkg-deb --contents failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let paths: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for p in &paths {
        ensure!(
            *p == "./" || p.starts_with("./usr/") || p.starts_with("./etc/"),
            "{} ships {p}: only usr/ and etc/ paths are allowed",
            deb.display()
        );
    }
    for want in [
        "./usr/bin/ferry",
        "./usr/lib/systemd/system/ferry-agent.service",
        "./etc/ferry/agent.toml",
        "./usr/share/man/man1/ferry.1.gz",
        "./usr/share/bash-completion/completions/ferry",
        "./usr/share/doc/ferry/copyright",
    ] {
        ensure!(paths.contains(&want), "{} lacks {want}", deb.display());
    }
    let conffiles = Command::new("dpkg-deb")
        .args(["--info"])
        .arg(deb)
        .arg("conffiles")
        .output()?;
    ensure!(
        String::from_utf8_lossy(&conffiles.stdout).trim() == "/etc/ferry/agent.toml",
        "the package's conffiles are not exactly /etc/ferry/agent.toml: {conffiles:?}"
    );
    Ok(())
}

/// lintian: no error or warning beyond [`LINTIAN_EXPLAINED`].
pub(super) fn lintian(deb: &Path) -> Result<()> {
    // lintian exits non-zero when it reports errors; the tags below decide.
    let out = bounded_status(
        Command::new("lintian")
            .args(["--tag-display-limit", "0", "--display-info"])
            .arg(deb),
        600,
        "lintian",
    )?;
    let text = out.stdout + &out.stderr;
    let mut bad = Vec::new();
    for line in text.lines() {
        let Some((level, rest)) = line.split_once(": ") else {
            continue;
        };
        if !matches!(level, "E" | "W") {
            continue;
        }
        let tag = rest
            .split_once(": ")
            .map(|(_, t)| t)
            .unwrap_or(rest)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if !LINTIAN_EXPLAINED.contains(&tag) {
            bad.push(line.to_owned());
        }
    }
    print!("{text}");
    ensure!(
        bad.is_empty(),
        "lintian reports what docs/operations.md does not explain:\n{}",
        bad.join("\n")
    );
    Ok(())
}
