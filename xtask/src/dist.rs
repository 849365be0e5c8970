//! `cargo xtask dist`: the Debian package operators install (`target/dist/ferry_VERSION_amd64.deb`),
//! and the check of the systemd unit that CI runs (`systemd-analyze verify`).
//!
//! The package is assembled here and built with `dpkg-deb` (no cargo-deb: one tool less to
//! install, and the maintainer scripts are plain files in `dist/debian/` that anyone can read).
//! Every path it ships is under `usr/` or `etc/`: nothing in it can replace `/lib`, `/bin` or
//! `/sbin`, which are symlinks into `/usr` on a merged-/usr host (issue 20: the old tarball's
//! `lib/` replaced `/lib` and broke every dynamically linked program). dpkg itself never replaces
//! a directory symlink with a directory.
//!
//! Layout: `/usr/bin/ferry`; the unit in `/usr/lib/systemd/system`; `/etc/ferry/agent.toml` as a
//! conffile (dpkg keeps an operator's edits on upgrade); man pages and completions generated
//! from the CLI definitions; docs, copyright and changelog in `/usr/share/doc/ferry`; the
//! maintainer scripts from `dist/debian/` (what they do: `docs/operations.md`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::CommandFactory;

use crate::dev::workspace_root;

const UNIT: &str = "ferry-agent.service";
/// The Debian package's name.
pub const PACKAGE: &str = "ferry";
const MAINTAINER: &str = "Ferry developers <ferry@example.invalid>";

/// Where cargo puts its output: `$CARGO_TARGET_DIR` (relative to the workspace root when
/// relative), else `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => workspace_root().join(d),
        _ => workspace_root().join("target"),
    }
}

/// Man pages (one per subcommand) and shell completions for `ferry`, generated from its clap
/// definitions, under `root` (`usr/share/...`, where Debian's shells look for them).
pub fn docs(root: &Path) -> Result<()> {
    let cmd = ferry_cli::Cli::command();
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
            "usr/share/zsh/vendor-completions",
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

/// `cargo xtask dist`: the release build, packaged: `target/dist/ferry_VERSION_amd64.deb`, with
/// VERSION the workspace's version plus `version_suffix` (e.g. `+test1`, for a newer build of
/// the same tree).
pub fn dist(version_suffix: &str) -> Result<PathBuf> {
    deb_version(version_suffix)?;
    let bin = build_release()?;
    deb(&bin, version_suffix)
}

/// `cargo build --release -p ferry-cli`; the binary's path.
pub fn build_release() -> Result<PathBuf> {
    crate::dev::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace_root())
            .args(["build", "--release", "-p", "ferry-cli"]),
    )?;
    let bin = target_dir().join("release/ferry");
    ensure!(bin.is_file(), "{} was not built", bin.display());
    Ok(bin)
}

/// The package's version: the workspace's, plus `suffix`, which must be empty or start with `+`
/// or `~` and hold only what a Debian version allows.
pub fn deb_version(suffix: &str) -> Result<String> {
    if !suffix.is_empty() {
        let ok = suffix.starts_with(['+', '~'])
            && suffix.len() > 1
            && suffix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.~".contains(c));
        ensure!(
            ok,
            "version suffix {suffix:?} is not usable in a Debian version: start it with `+` (a \
             newer version) or `~` (an older one), then letters, digits, `.`, `+` or `~` (e.g. \
             `+test1`)"
        );
    }
    Ok(format!("{}{suffix}", env!("CARGO_PKG_VERSION")))
}

/// The package file `dist` writes for `version`.
pub fn deb_path(version: &str) -> PathBuf {
    target_dir()
        .join("dist")
        .join(format!("{PACKAGE}_{version}_amd64.deb"))
}

/// Package `bin` (a release build of this tree) as `target/dist/ferry_VERSION_amd64.deb`.
pub fn deb(bin: &Path, version_suffix: &str) -> Result<PathBuf> {
    ensure!(
        std::env::consts::ARCH == "x86_64",
        "the package is built for amd64 only; this is {}",
        std::env::consts::ARCH
    );
    let version = deb_version(version_suffix)?;
    let root = workspace_root();
    let out = target_dir().join("dist");
    let stage = out.join(format!("stage-{version}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let copy = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let dst = stage.join(to);
        std::fs::create_dir_all(dst.parent().context("path")?)?;
        std::fs::copy(from, &dst).with_context(|| format!("cannot copy {}", from.display()))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let dist = root.join("dist");
    copy(bin, "usr/bin/ferry", 0o755)?;
    crate::dev::run(
        Command::new("strip")
            .args(["--remove-section=.comment", "--remove-section=.note"])
            .arg(stage.join("usr/bin/ferry")),
    )
    .context("cannot strip the binary (binutils)")?;
    copy(
        &dist.join(UNIT),
        &format!("usr/lib/systemd/system/{UNIT}"),
        0o644,
    )?;
    copy(&dist.join("agent.toml"), "etc/ferry/agent.toml", 0o644)?;
    let doc = "usr/share/doc/ferry";
    copy(
        &dist.join("debian/copyright"),
        &format!("{doc}/copyright"),
        0o644,
    )?;
    copy(&root.join("README.md"), &format!("{doc}/README.md"), 0o644)?;
    copy(
        &root.join("docs/operations.md"),
        &format!("{doc}/operations.md"),
        0o644,
    )?;
    std::fs::write(stage.join(doc).join("changelog"), changelog(&version)?)?;
    docs(&stage)?;
    verify_unit(&stage.join("usr/bin/ferry"), &stage)?;
    // Debian policy: man pages and docs (except copyright) compressed with gzip -9n.
    let mut gz: Vec<PathBuf> = files(&stage.join("usr/share/man"))?;
    gz.extend(
        files(&stage.join(doc))?
            .into_iter()
            .filter(|p| !p.ends_with("copyright")),
    );
    crate::dev::run(Command::new("gzip").args(["-9nf", "--"]).args(&gz))?;

    // DEBIAN/: control, conffiles, md5sums, maintainer scripts.
    let meta = stage.join("DEBIAN");
    std::fs::create_dir_all(&meta)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &dist.join("debian").join(script),
            &format!("DEBIAN/{script}"),
            0o755,
        )?;
    }
    copy(&dist.join("debian/conffiles"), "DEBIAN/conffiles", 0o644)?;
    let payload = files(&stage)?
        .into_iter()
        .filter(|p| !p.starts_with(&meta))
        .collect::<Vec<_>>();
    for p in &payload {
        let rel = p.strip_prefix(&stage)?;
        let top = rel.components().next().map(|c| c.as_os_str().to_owned());
        ensure!(
            top.as_deref() == Some("usr".as_ref()) || top.as_deref() == Some("etc".as_ref()),
            "{} is outside usr/ and etc/: the package must not ship it (a top-level lib/, bin/ \
             or sbin/ would alias /usr on a merged-/usr host)",
            rel.display()
        );
    }
    let rels: Vec<PathBuf> = payload
        .iter()
        .map(|p| p.strip_prefix(&stage).map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;
    let sums = Command::new("md5sum")
        .arg("--")
        .args(&rels)
        .current_dir(&stage)
        .output()
        .context("cannot run md5sum")?;
    ensure!(sums.status.success(), "md5sum failed: {sums:?}");
    std::fs::write(meta.join("md5sums"), &sums.stdout)?;
    let installed_kib: u64 = payload
        .iter()
        .map(|p| Ok(std::fs::metadata(p)?.len().div_ceil(1024)))
        .sum::<Result<u64>>()?;
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Section: admin\n\
         Priority: optional\n\
         Description: host agent that live-migrates KVM guests between hosts\n \
         Ferry runs this host's KVM guests and live-migrates them to a peer agent\n \
         over a dedicated migration network: pre-copy rounds over KVM's dirty log,\n \
         compressed page streams over io_uring, a switchover of a few milliseconds,\n \
         and the guest back on the source if anything fails before the commit point.\n \
         .\n \
         The ferry-agent systemd unit runs the agent; the ferry command talks to it.\n",
        depends = shlib_depends(&stage, &stage.join("usr/bin/ferry"))?,
    );
    std::fs::write(meta.join("control"), control)?;
    // Directories 0755 whatever the umask was.
    for d in dirs(&stage)? {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }

    let deb = deb_path(&version);
    crate::dev::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )
    .context("dpkg-deb could not build the package")?;
    std::fs::remove_dir_all(&stage)?;
    println!("{}", deb.display());
    Ok(deb)
}

/// The package's `Depends`: the shared libraries `bin` links against, as dpkg-shlibdeps (from
/// dpkg-dev) finds them.
fn shlib_depends(stage: &Path, bin: &Path) -> Result<String> {
    // dpkg-shlibdeps reads debian/control from its working directory.
    let work = stage.with_extension("shlibdeps");
    std::fs::create_dir_all(work.join("debian"))?;
    std::fs::write(
        work.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: amd64\n"),
    )?;
    let out = Command::new("dpkg-shlibdeps")
        .arg("-O")
        .arg(format!("-e{}", bin.display()))
        .current_dir(&work)
        .output()
        .context("cannot run dpkg-shlibdeps (Debian package dpkg-dev; `cargo xtask deps`)")?;
    std::fs::remove_dir_all(&work)?;
    ensure!(
        out.status.success(),
        "dpkg-shlibdeps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let deps = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {text}"))?;
    Ok(deps.trim().to_owned())
}

/// A Debian changelog with one entry for `version`, dated like the commit it was built from.
fn changelog(version: &str) -> Result<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    let date = match git(&["log", "-1", "--format=%cD"]) {
        Some(d) => d,
        None => {
            let o = Command::new("date")
                .arg("-R")
                .output()
                .context("cannot run date")?;
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        }
    };
    let from = match commit {
        Some(c) => format!("commit {c}"),
        None => "a tree outside git".to_owned(),
    };
    Ok(format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  \
         * Built by `cargo xtask dist` from {from}.\n\n \
         -- {MAINTAINER}  {date}\n"
    ))
}

/// Every regular file under `dir`, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, &mut |p, ft| {
        if ft.is_file() {
            out.push(p.to_path_buf());
        }
    })?;
    out.sort();
    Ok(out)
}

/// Every directory under `dir`, `dir` included.
fn dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![dir.to_path_buf()];
    walk(dir, &mut |p, ft| {
        if ft.is_dir() {
            out.push(p.to_path_buf());
        }
    })?;
    Ok(out)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, std::fs::FileType)) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e?;
        let ft = e.file_type()?;
        f(&e.path(), ft);
        if ft.is_dir() {
            walk(&e.path(), f)?;
        }
    }
    Ok(())
}
