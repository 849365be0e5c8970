//! `cargo xtask test --packaging`: the Debian package from `cargo xtask dist`, tested under a real
//! systemd (issue 20).
//!
//! A Debian 12 root made with `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus`
//! (the mirror from apt's own sources; cached in `target/packaging/base-bookworm`, so only the
//! first run needs Debian's archive) is copied afresh for each run and booted with
//! `systemd-nspawn -b --bind=/dev/kvm --private-network`; commands run inside with
//! `nsenter -t <its PID 1> -a`. In it the test installs the package, checks the agent is active
//! and enabled, runs a guest through the CLI, restarts the agent (its guests stop with it:
//! docs/operations.md), upgrades twice (an operator's edited config survives; an agent that
//! runs guests is not restarted unless the operator asks), removes and purges, and compares the
//! root with its state before the install: nothing is left.
//!
//! Every step is bounded in time; the container is powered off (or killed, by PID) and its
//! root removed even when a step fails. Needs root, /dev/kvm, debootstrap, systemd-nspawn
//! (systemd-container), nsenter, dpkg-deb, dpkg-shlibdeps (dpkg-dev) and lintian.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::dist;

/// The Debian release the package is tested on.
const SUITE: &str = "bookworm";
/// Packages the base root gets beyond minbase: systemd as PID 1.
const INCLUDE: &str = "systemd,systemd-sysv,dbus";
/// Where the packages appear inside the container (a read-only bind mount).
const DEBS_IN: &str = "/mnt/ferry-debs";
/// PATH and environment for commands inside the container.
const PATH_IN: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// lintian warnings the package keeps on purpose, each explained in docs/operations.md
/// ("The package and lintian"). Today none: lintian reports no error or warning (its two
/// info-level tags are explained there).
const LINTIAN_EXPLAINED: &[&str] = &[];

/// Run the packaging test end to end.
pub fn run() -> Result<()> {
    let t0 = Instant::now();
    preflight()?;
    let bin = dist::build_release()?;
    let versions = ["", "+test1", "+test2"]
        .iter()
        .map(|s| dist::deb_version(s))
        .collect::<Result<Vec<_>>>()?;
    let debs = ["", "+test1", "+test2"]
        .iter()
        .map(|s| dist::deb(&bin, s))
        .collect::<Result<Vec<_>>>()?;
    step(t0, "packages built");
    check_contents(&debs[0])?;
    lintian(&debs[0])?;
    step(t0, "lintian");

    let work = dist::target_dir().join("packaging");
    std::fs::create_dir_all(&work)?;
    let base = base_root(&work)?;
    step(t0, "base root ready");
    remove_stale_runs(&work);
    let run_dir = RunDir::new(work.join(format!("run-{}", std::process::id())))?;
    let root = run_dir.path.join("root");
    copy_tree(&base, &root)?;
    let debs_dir = debs[0].parent().context("deb path")?.to_path_buf();
    let mut c = Container::boot(&root, &debs_dir, &run_dir.path.join("nspawn.log"))?;
    c.wait_booted()?;
    step(t0, "container booted (systemd is PID 1)");
    let before = snapshot(&root)?;
    let result = scenario(&c, &root, &versions, &debs, &before, t0);
    if let Err(e) = &result {
        eprintln!("packaging test failed: {e:#}");
        eprintln!("{}", c.diagnostics());
    }
    result?;
    c.poweroff()?;
    step(t0, "container powered off");
    drop(run_dir);
    println!("packaging test passed in {:.0?}", t0.elapsed());
    Ok(())
}

fn step(t0: Instant, what: &str) {
    println!("packaging [{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
}

/// The install → guest → restart → upgrade → remove → purge scenario inside the container.
fn scenario(
    c: &Container,
    root: &Path,
    versions: &[String],
    debs: &[PathBuf],
    before: &BTreeSet<String>,
    t0: Instant,
) -> Result<()> {
    let deb_in = |i: usize| {
        format!(
            "{DEBS_IN}/{}",
            debs[i].file_name().unwrap_or_default().to_string_lossy()
        )
    };

    // Install.
    let out = c.ok(&format!("dpkg -i {}", deb_in(0)), 180)?;
    step(t0, &format!("installed {}", versions[0]));
    let state = active_state(c)?;
    ensure!(
        state == "active",
        "ferry-agent is {state}, not active, after the install; dpkg said:\n{out}"
    );
    ensure!(c.ok("systemctl is-enabled ferry-agent", 10)?.trim() == "enabled");
    ensure!(installed_version(c)? == versions[0]);
    c.ok(
        "test -L /lib && test -L /bin && test -L /sbin && /bin/true && \
         test -f /usr/lib/systemd/system/ferry-agent.service && \
         test \"$(stat -c %a /var/lib/ferry)\" = 750",
        10,
    )
    .context("after the install: /lib, /bin, /sbin must still be symlinks into /usr, the unit in /usr/lib, /var/lib/ferry 0750")?;
    step(t0, "ferry-agent active and enabled");

    // A guest through the CLI.
    c.ok("ferry vm create g1 --memory 128M --start", 60)?;
    guest_runs(c, "g1")?;
    step(t0, "guest g1 runs under the unit");

    // The operator edits the config and sets a cluster key; a restart stops the guests
    // (docs/operations.md) and picks up the config.
    c.ok(
        "sed -i 's/^memory_reserve_mib = 2048 /memory_reserve_mib = 1536 /' /etc/ferry/agent.toml && \
         grep -q '^memory_reserve_mib = 1536 ' /etc/ferry/agent.toml && \
         head -c 48 /dev/urandom | base64 > /etc/ferry/cluster.key && chmod 0600 /etc/ferry/cluster.key && \
         printf '\\n# Edited by the operator (packaging test).\\n[cluster]\\nkey_file = \"/etc/ferry/cluster.key\"\\n' >> /etc/ferry/agent.toml && \
         ferry agent --check-config",
        30,
    )?;
    let edited = c.ok("cat /etc/ferry/agent.toml", 10)?;
    let pid0 = main_pid(c)?;
    c.ok("systemctl restart ferry-agent", 90)?;
    let pid1 = main_pid(c)?;
    ensure!(pid1 != pid0, "systemctl restart kept MainPID {pid0}");
    ensure!(
        vm_count(c)? == 0,
        "after a restart the agent still lists guests; docs/operations.md says they stop with it"
    );
    let journal = c.ok("journalctl -u ferry-agent --no-pager -o cat", 20)?;
    ensure!(
        journal.contains("agent stopping: its guests stop with it"),
        "the journal does not say the guests stopped:\n{journal}"
    );
    ensure!(
        host(c)?["memory_reserve_mib"] == 1536,
        "the restarted agent does not use the edited config"
    );
    step(
        t0,
        "restart: guests stopped as documented, edited config in use",
    );

    // Upgrade with a guest running: the agent is not restarted, the guest keeps running,
    // the edited config survives.
    c.ok("ferry vm create g2 --memory 128M --start", 60)?;
    guest_runs(c, "g2")?;
    let out = c.ok(&format!("dpkg -i {}", deb_in(1)), 180)?;
    ensure!(installed_version(c)? == versions[1]);
    ensure!(
        out.contains("was NOT restarted"),
        "the upgrade did not say it left the agent running:\n{out}"
    );
    for line in out.lines().filter(|l| l.starts_with("ferry:")) {
        println!("  dpkg said: {line}");
    }
    ensure!(
        main_pid(c)? == pid1,
        "the upgrade restarted an agent that runs a guest"
    );
    guest_runs(c, "g2")?;
    config_kept(c, &edited)?;
    step(
        t0,
        &format!(
            "upgrade to {} with a guest: agent kept, guest runs, config kept",
            versions[1]
        ),
    );

    // Upgrade, asking for the restart: the agent restarts (its guest stops).
    let out = c.ok(
        &format!("FERRY_RESTART_ON_UPGRADE=1 dpkg -i {}", deb_in(2)),
        180,
    )?;
    ensure!(installed_version(c)? == versions[2]);
    let pid2 = main_pid(c)?;
    ensure!(
        pid2 != pid1,
        "FERRY_RESTART_ON_UPGRADE=1 did not restart the agent:\n{out}"
    );
    ensure!(active_state(c)? == "active");
    ensure!(vm_count(c)? == 0);
    config_kept(c, &edited)?;
    step(
        t0,
        &format!(
            "upgrade to {} with FERRY_RESTART_ON_UPGRADE=1: agent restarted",
            versions[2]
        ),
    );

    // Reinstall with no guests: restarted onto the new files without being asked.
    c.ok(&format!("dpkg -i {}", deb_in(2)), 180)?;
    let pid3 = main_pid(c)?;
    ensure!(
        pid3 != pid2,
        "an agent without guests was not restarted on upgrade"
    );
    ensure!(active_state(c)? == "active");
    config_kept(c, &edited)?;
    step(t0, "reinstall without guests: agent restarted");

    // Remove: stopped, files gone, config kept.
    c.ok("dpkg -r ferry", 120)?;
    let state = active_state(c)?;
    ensure!(
        state == "inactive" || state == "unknown",
        "ferry-agent is {state} after dpkg -r"
    );
    ensure!(
        c.ok(
            "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = ferry ] && echo $p; done; true",
            10
        )?
        .trim()
        .is_empty(),
        "a ferry process survived dpkg -r"
    );
    c.ok(
        "test ! -e /usr/bin/ferry && test ! -e /usr/lib/systemd/system/ferry-agent.service && \
         dpkg-query -W -f '${Status}' ferry | grep -qx 'deinstall ok config-files'",
        10,
    )
    .context("after dpkg -r: binary and unit gone, the package in state config-files")?;
    config_kept(c, &edited)?;
    step(t0, "removed: agent stopped, files gone, config kept");

    // Purge: nothing left.
    c.ok("dpkg -P ferry", 120)?;
    c.ok(
        "! dpkg-query -W ferry 2>/dev/null && test ! -e /etc/ferry && test ! -e /var/lib/ferry \
         && test ! -e /run/ferry && ! systemctl cat ferry-agent.service >/dev/null 2>&1",
        10,
    )
    .context(
        "after dpkg -P: the package unknown, /etc/ferry, /var/lib/ferry, /run/ferry gone, no unit",
    )?;
    let after = snapshot(root)?;
    let added: Vec<_> = after.difference(before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    ensure!(
        added.is_empty() && removed.is_empty(),
        "after the purge the root differs from before the install:\nleft behind: {added:?}\n\
         gone: {removed:?}"
    );
    c.ok(
        "test -L /lib && /bin/true && systemctl is-system-running | grep -Eqx 'running|degraded'",
        20,
    )?;
    step(
        t0,
        &format!("purged: nothing left ({} paths compared)", before.len()),
    );
    Ok(())
}

/// `systemctl is-active ferry-agent`: active, inactive, activating, failed, unknown, ...
fn active_state(c: &Container) -> Result<String> {
    Ok(c.sh("systemctl is-active ferry-agent", 10)?
        .stdout
        .trim()
        .to_owned())
}

fn installed_version(c: &Container) -> Result<String> {
    Ok(c.ok("dpkg-query -W -f '${Version}' ferry", 10)?
        .trim()
        .to_owned())
}

fn main_pid(c: &Container) -> Result<u32> {
    let s = c.ok("systemctl show -p MainPID --value ferry-agent", 10)?;
    let pid: u32 = s.trim().parse().with_context(|| format!("MainPID {s:?}"))?;
    ensure!(pid != 0, "ferry-agent has no main process");
    Ok(pid)
}

fn json(c: &Container, args: &str) -> Result<serde_json::Value> {
    let o = c.sh(&format!("ferry --json {args}"), 30)?;
    ensure!(
        o.status.success(),
        "`ferry --json {args}` failed ({}): {}{}",
        o.status,
        o.stdout,
        o.stderr
    );
    serde_json::from_str(&o.stdout)
        .with_context(|| format!("`ferry --json {args}` printed {}", o.stdout))
}

fn host(c: &Container) -> Result<serde_json::Value> {
    json(c, "host")
}

fn vm_count(c: &Container) -> Result<usize> {
    Ok(json(c, "vm list")?
        .as_array()
        .context("vm list is not an array")?
        .len())
}

/// The guest is running and its vCPU's heartbeat advances.
fn guest_runs(c: &Container, vm: &str) -> Result<()> {
    let beats = |v: &serde_json::Value| v["heartbeats"][0]["beats"].as_u64();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = None;
    loop {
        let v = json(c, &format!("vm inspect {vm}"))?;
        ensure!(v["state"] == "running", "{vm} is not running: {v}");
        match (first, beats(&v)) {
            (None, Some(b)) => first = Some(b),
            (Some(a), Some(b)) if b > a => return Ok(()),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("{vm}'s heartbeat did not advance in 30 s: {v}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The operator's edited config is intact and dpkg left no copies next to it.
fn config_kept(c: &Container, edited: &str) -> Result<()> {
    let now = c.ok("cat /etc/ferry/agent.toml", 10)?;
    ensure!(
        now == edited,
        "the edited /etc/ferry/agent.toml changed:\n{now}"
    );
    let extra = c.ok("ls /etc/ferry", 10)?;
    ensure!(
        extra.split_whitespace().collect::<Vec<_>>() == ["agent.toml", "cluster.key"],
        "/etc/ferry holds {extra:?}, expected agent.toml and cluster.key"
    );
    Ok(())
}

/// Root, /dev/kvm and the tools the test runs.
fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the packaging test needs root (debootstrap, systemd-nspawn)"
    );
    ensure!(
        Path::new("/dev/kvm").exists(),
        "no /dev/kvm: the packaging test runs a guest under the installed agent"
    );
    let missing: Vec<String> = [
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("lintian", "lintian"),
        ("strip", "binutils"),
    ]
    .iter()
    .filter(|(tool, _)| find_tool(tool).is_none())
    .map(|(tool, pkg)| format!("{tool} (Debian package {pkg})"))
    .collect();
    ensure!(
        missing.is_empty(),
        "the packaging test needs {}: run `cargo xtask deps`",
        missing.join(", ")
    );
    Ok(())
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The package holds only `usr/` and `etc/` paths (nothing that could replace /lib, /bin or
/// /sbin on a merged-/usr host), and the files the issue asks for.
fn check_contents(deb: &Path) -> Result<()> {
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
fn lintian(deb: &Path) -> Result<()> {
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

/// The cached Debian root: made once with debootstrap (into a temporary directory, renamed
/// when complete, so an interrupted run leaves no half-made cache).
fn base_root(work: &Path) -> Result<PathBuf> {
    let base = work.join(format!("base-{SUITE}"));
    let stamp = work.join(format!("base-{SUITE}.done"));
    let recipe = format!("debootstrap --variant=minbase --include={INCLUDE} {SUITE}");
    if base.is_dir() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == recipe) {
        println!("packaging: reusing {} ({recipe})", base.display());
        return Ok(base);
    }
    let mirror = mirror()?;
    let tmp = work.join(format!("base-{SUITE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "packaging: {recipe} {} {mirror} (once; cached)",
        tmp.display()
    );
    let out = bounded(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&tmp)
            .arg(&mirror),
        1200,
        "debootstrap",
    );
    if let Err(e) = out {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "debootstrap of {SUITE} from {mirror} failed: is Debian's archive reachable? \
             (set FERRY_PACKAGING_MIRROR to use another mirror)"
        )));
    }
    let _ = std::fs::remove_dir_all(&base);
    std::fs::rename(&tmp, &base)?;
    std::fs::write(&stamp, format!("{recipe}\n"))?;
    Ok(base)
}

/// The Debian mirror: `FERRY_PACKAGING_MIRROR`, else the first `deb` source in apt's own
/// configuration that serves the release itself (not -security or -updates).
fn mirror() -> Result<String> {
    if let Some(m) = std::env::var_os("FERRY_PACKAGING_MIRROR") {
        return Ok(m.to_string_lossy().into_owned());
    }
    let mut entries: Vec<(String, Vec<String>)> = Vec::new(); // (uri, suites)
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let name = f.to_string_lossy();
        if name.ends_with(".sources") {
            entries.extend(parse_deb822(&text));
        } else if name.ends_with(".list") {
            entries.extend(parse_one_line(&text));
        }
    }
    let is_base = |s: &str| !s.contains('-') && !s.contains('/');
    entries
        .iter()
        .find(|(_, suites)| suites.iter().any(|s| s == SUITE))
        .or_else(|| entries.iter().find(|(_, s)| s.iter().any(|s| is_base(s))))
        .map(|(uri, _)| uri.clone())
        .context(
            "no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d: set \
             FERRY_PACKAGING_MIRROR (e.g. http://deb.debian.org/debian)",
        )
}

/// `deb` entries of a deb822 `.sources` file: (first URI, suites).
fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no"))
            || !types.split_whitespace().any(|t| t == "deb")
        {
            continue;
        }
        if let Some(uri) = uris.split_whitespace().next() {
            out.push((
                uri.to_owned(),
                suites.split_whitespace().map(str::to_owned).collect(),
            ));
        }
    }
    out
}

/// `deb` lines of a one-line-style `.list` file: (URI, [suite]).
fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        // Options in brackets, e.g. [arch=amd64 signed-by=...].
        let rest = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']').map(|(_, r)| r).unwrap_or(""),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_owned(), vec![suite.to_owned()]));
        }
    }
    out
}

/// `cp -a --reflink=auto` (the root holds device nodes, owners and modes to keep).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    bounded(
        Command::new("cp")
            .args(["-a", "--reflink=auto", "--"])
            .arg(from)
            .arg(to),
        300,
        "copying the base root",
    )?;
    Ok(())
}

/// Every path in the root, except the ones that change by themselves while a system runs
/// (logs, caches, dpkg's and apt's databases, systemd's own state files).
fn snapshot(root: &Path) -> Result<BTreeSet<String>> {
    const SKIP: &[&str] = &[
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "mnt",
        "var/tmp",
        "var/log",
        "var/cache",
        "var/lib/dpkg",
        "var/lib/apt",
        "var/lib/systemd/timers",
        "var/lib/systemd/coredump",
        "var/lib/systemd/random-seed",
    ];
    fn walk(root: &Path, rel: &Path, out: &mut BTreeSet<String>, skip: &[&str]) -> Result<()> {
        let dir = root.join(rel);
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let e = e?;
            let r = rel.join(e.file_name());
            let s = r.to_string_lossy().into_owned();
            if skip.contains(&s.as_str()) {
                continue;
            }
            let ft = e.file_type()?;
            out.insert(s);
            if ft.is_dir() {
                walk(root, &r, out, skip)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(root, Path::new(""), &mut out, SKIP)?;
    Ok(out)
}

/// Remove `run-PID` directories of earlier runs that were killed before they could clean up:
/// their process is gone and no systemd-nspawn still uses the directory.
fn remove_stale_runs(work: &Path) {
    let Ok(rd) = std::fs::read_dir(work) else {
        return;
    };
    let in_use = |dir: &Path| {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return true;
        };
        let needle = dir.to_string_lossy().into_owned();
        procs.flatten().any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = e.path();
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && !in_use(&dir)
        {
            println!(
                "packaging: removing {} (left by an interrupted run)",
                dir.display()
            );
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                eprintln!("packaging: cannot remove {}: {err}", dir.display());
            }
        }
    }
}

/// The run's directory (the container's root, nspawn's log), removed when dropped.
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("packaging: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// What a bounded command printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Run `cmd` in its own process group; kill the group if it runs past `secs`. Fails when the
/// command cannot start, times out, or exits non-zero.
fn bounded(cmd: &mut Command, secs: u64, what: &str) -> Result<Output> {
    let out = bounded_status(cmd, secs, what)?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    Ok(out)
}

/// As [`bounded`], but a non-zero exit is returned, not an error.
fn bounded_status(cmd: &mut Command, secs: u64, what: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {what} ({cmd:?})"))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(child.stdout.take().map(|r| Box::new(r) as _));
    let err = reader(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            kill_group(child.id());
            let _ = child.wait();
            let (o, e) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            bail!("{what} did not finish within {secs} s (killed):\n{o}{e}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// SIGKILL the process group `pgid` (a child this module started with `process_group(0)`).
fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        if pgid > 1 {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is shared.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

fn kill_pid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 1 {
            // SAFETY: kill(2) on a pid this module started; no memory is shared.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A booted systemd-nspawn container: nspawn (our child) and the container's PID 1.
struct Container {
    nspawn: Child,
    init: u32,
    log: PathBuf,
}

impl Container {
    fn boot(root: &Path, debs: &Path, log: &Path) -> Result<Self> {
        let logf = std::fs::File::create(log)?;
        let machine = format!("ferry-pkg-{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "-b",
                "--bind=/dev/kvm",
                "--private-network",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
            ])
            .arg(format!("--machine={machine}"))
            .arg(format!("--bind-ro={}:{DEBS_IN}", debs.display()))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            // In our process group, so a Ctrl-C of the test reaches nspawn too (it then ends
            // the container).
            .spawn()
            .context("cannot start systemd-nspawn (Debian package systemd-container)")?;
        let mut c = Self {
            nspawn,
            init: 0,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn exited ({st}) before the container booted:\n{}",
                    c.log_text()
                );
            }
            if let Some(pid) = container_init(c.nspawn.id()) {
                c.init = pid;
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!(
                    "no container PID 1 under systemd-nspawn within 30 s:\n{}",
                    c.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait (at most 120 s) until systemd reports the system running (or degraded, with the
    /// failed units printed).
    fn wait_booted(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now()).as_secs();
            let o = self.sh("systemctl is-system-running --wait", remaining.max(1))?;
            match o.stdout.trim() {
                "running" => return Ok(()),
                "degraded" => {
                    let failed = self.sh("systemctl --failed --no-legend", 10)?;
                    println!(
                        "packaging: container degraded (not ferry's units):\n{}",
                        failed.stdout
                    );
                    return Ok(());
                }
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "the container's systemd did not finish booting in 120 s: {}{}\n{}",
                    o.stdout,
                    o.stderr,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `sh -c script` inside the container, with a clean environment, at most `secs`.
    fn sh(&self, script: &str, secs: u64) -> Result<Output> {
        bounded_status(
            Command::new("nsenter")
                .arg("-t")
                .arg(self.init.to_string())
                .args(["-a", "env", "-i"])
                .arg(format!("PATH={PATH_IN}"))
                .args([
                    "LANG=C.UTF-8",
                    "HOME=/root",
                    "TERM=dumb",
                    "DEBIAN_FRONTEND=noninteractive",
                    "SYSTEMD_PAGER=",
                    "sh",
                    "-c",
                    script,
                ]),
            secs,
            script,
        )
    }

    /// As [`Container::sh`]; a non-zero exit is an error. Returns stdout and stderr together.
    fn ok(&self, script: &str, secs: u64) -> Result<String> {
        let o = self.sh(script, secs)?;
        ensure!(
            o.status.success(),
            "in the container, `{script}` failed ({}):\n{}{}",
            o.status,
            o.stdout,
            o.stderr
        );
        Ok(if o.stderr.is_empty() {
            o.stdout
        } else if o.stdout.is_empty() {
            o.stderr
        } else {
            o.stdout + &o.stderr
        })
    }

    /// The agent's status and journal and nspawn's log, for a failure report.
    fn diagnostics(&self) -> String {
        let mut s = String::new();
        for cmd in [
            "systemctl status ferry-agent --no-pager -l",
            "journalctl -u ferry-agent --no-pager -n 50 -o cat",
            "systemctl --failed --no-legend",
        ] {
            if let Ok(o) = self.sh(cmd, 15) {
                s += &format!("--- {cmd}\n{}{}", o.stdout, o.stderr);
            }
        }
        s + "--- systemd-nspawn\n" + &self.log_text()
    }

    fn log_text(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `systemctl poweroff` inside, then wait (at most 60 s) for nspawn to exit.
    fn poweroff(&mut self) -> Result<()> {
        if self.nspawn.try_wait()?.is_some() {
            return Ok(());
        }
        // The command may lose its connection as systemd goes down; the exit below decides.
        let _ = self.sh("systemctl poweroff", 20);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.nspawn.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the container did not power off within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Err(e) = self.poweroff() {
            eprintln!(
                "packaging: {e}; killing the container (PID 1 {})",
                self.init
            );
            // Killing a PID namespace's init kills everything in it.
            kill_pid(self.init);
            kill_pid(self.nspawn.id());
            let _ = self.nspawn.wait();
        }
    }
}

/// The container's PID 1 as this namespace sees it: a descendant of `nspawn` whose innermost
/// PID (the last `NSpid` entry) is 1.
fn container_init(nspawn: u32) -> Option<u32> {
    let ppid_of = |pid: u32| -> Option<u32> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the last ')' (the command name may hold spaces): state, ppid, ...
        s.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let inner_one = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|v| {
                let ids: Vec<&str> = v.split_whitespace().collect();
                ids.len() >= 2 && ids.last() == Some(&"1")
            });
        if !inner_one {
            continue;
        }
        // Walk up at most a few generations to nspawn.
        let mut p = pid;
        for _ in 0..4 {
            match ppid_of(p) {
                Some(pp) if pp == nspawn => return Some(pid),
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\n\
                      URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n\nTypes: deb-src\n\
                      URIs: http://src.example\nSuites: bookworm\n";
        let e = parse_deb822(deb822);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].0, "http://deb.debian.org/debian");
        assert_eq!(e[0].1, ["bookworm", "bookworm-updates"]);
        let one = "# comment\ndeb-src http://x bookworm main\n\
                   deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            parse_one_line(one),
            [(
                "http://mirror.example/debian".to_owned(),
                vec!["bookworm".to_owned()]
            )]
        );
    }
}
