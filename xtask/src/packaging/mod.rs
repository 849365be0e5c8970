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
//!
//! - this file: the run and its scenario, the preflight check;
//! - `deb`: the package's contents and lintian;
//! - `mirror`: which Debian mirror debootstrap uses (apt's own sources);
//! - `root`: the cached base root, the run's copy of it and its snapshots;
//! - `container`: the booted systemd-nspawn container and commands inside it;
//! - `command`: the bounded runner every outside command goes through.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::dist;

mod command;
mod container;
mod deb;
mod mirror;
mod root;

use container::Container;
use deb::{check_contents, lintian};
use root::{base_root, copy_tree, remove_stale_runs, snapshot, RunDir};

/// The Debian release the package is tested on.
const SUITE: &str = "bookworm";
/// Packages the base root gets beyond minbase: systemd as PID 1.
const INCLUDE: &str = "systemd,systemd-sysv,dbus";
/// Where the packages appear inside the container (a read-only bind mount).
const DEBS_IN: &str = "/mnt/ferry-debs";
/// PATH and environment for commands inside the container.
const PATH_IN: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

    // `[vmm] mode = "process"` under the packaged unit's sandbox (its capabilities and
    // RestrictNamespaces=mnt are what the VMM's jail needs): a guest runs in a jailed `ferry vmm`
    // and outlives `systemctl restart`; the new agent adopts it. The config lives in /run (a
    // drop-in points ExecStart at it), so /etc/ferry stays as the operator left it.
    c.ok(
        "mkdir -p /run/systemd/system/ferry-agent.service.d && \
         { cat /etc/ferry/agent.toml; printf '\\n[vmm]\\nmode = \"process\"\\n'; } > /run/ferry-process.toml && \
         printf '[Service]\\nExecStartPre=\\nExecStartPre=/usr/bin/ferry agent --config /run/ferry-process.toml --check-config\\nExecStart=\\nExecStart=/usr/bin/ferry agent --config /run/ferry-process.toml --log-format text\\n' \
           > /run/systemd/system/ferry-agent.service.d/process.conf && \
         systemctl daemon-reload && systemctl restart ferry-agent",
        90,
    )?;
    ensure!(active_state(c)? == "active");
    c.ok("ferry vm create p1 --memory 128M --start", 60)?;
    guest_runs(c, "p1")?;
    // One line per process of p1's VMM (the monitor, root; the VMM, jailed).
    let vmm = c.ok(
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^/usr/bin/ferry vmm --name p1 ' \
           && echo $(grep -E '^(Uid|CapEff):' $p/status); done; true",
        10,
    )?;
    ensure!(
        vmm.lines()
            .any(|l| l.contains("Uid: 65534") && l.contains("CapEff: 0000000000000000")),
        "the VMM of p1 is not jailed (nobody, no capabilities):\n{vmm}"
    );
    c.ok("systemctl restart ferry-agent", 90)?;
    ensure!(active_state(c)? == "active");
    guest_runs(c, "p1")?;
    c.ok("ferry vm destroy p1", 60)?;
    c.ok(
        "rm -r /run/systemd/system/ferry-agent.service.d /run/ferry-process.toml && \
         systemctl daemon-reload && systemctl restart ferry-agent",
        90,
    )?;
    ensure!(active_state(c)? == "active");
    config_kept(c, &edited)?;
    step(
        t0,
        "process mode under the unit: guest jailed, outlives a restart, adopted",
    );

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
