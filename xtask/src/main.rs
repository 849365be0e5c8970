//! `cargo xtask`: Ferry's development tasks. A thin command line over the `xtask` library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use xtask::lab::{self, Lab, LabOptions};

/// Prints a line to stdout, ignoring a closed pipe (`cargo xtask lab status | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Ferry's development tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// The two-host lab: network namespaces `ferry-NAME-{a,b,sw}`, datastores and agents.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Install the Debian packages of every program the tests, benches and xtask run
    /// (apt-get; root). `--check` lists them and fails on a missing one, installing nothing.
    Deps {
        /// List every program with its package and status; fail if one is missing.
        #[arg(long)]
        check: bool,
    },
    /// Rebuild ebpf/netpin.bpf.o from ebpf/netpin.bpf.c (clang-19); --check compares instead.
    BuildEbpf {
        /// Fail if the committed object does not match a fresh build.
        #[arg(long)]
        check: bool,
    },
    /// Rebuild guest/ferry-guest.bin (the service guest, guest/); --check compares instead.
    BuildGuest {
        /// Fail if the committed image does not match a fresh build.
        #[arg(long)]
        check: bool,
    },
    /// Run everything CI runs: deps, fmt check, clippy, build, all tests (root, /dev/kvm).
    Test {
        /// Instead: the packaging test only. Installs the .deb into a fresh Debian 12 root
        /// (debootstrap, Debian's archive; cached under target/packaging), boots it under
        /// systemd-nspawn and runs a guest, restarts, upgrades, removes and purges (minutes).
        #[arg(long)]
        packaging: bool,
        /// Extra arguments for `cargo test`, e.g. `-- --test-threads 1`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The demo: build the lab, run a 1 GiB workload guest and a raw guest on host `a`.
    Demo,
    /// A release build packaged for deployment: target/dist/ferry_VERSION_amd64.deb (binary,
    /// systemd unit, /etc/ferry/agent.toml as a conffile, man pages, completions, docs,
    /// maintainer scripts); checks the unit with systemd-analyze verify.
    Dist {
        /// Appended to the package version, e.g. `+test1` for a newer build of the same tree.
        #[arg(long, default_value = "")]
        version_suffix: String,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// Workload guest in the lab: requested vs measured dirty rate, heartbeat rate, agent CPU,
    /// pause latency (table, and JSON lines in target/bench/guest.jsonl).
    Guest {
        /// Seconds to measure each dirty rate.
        #[arg(long, default_value_t = 5)]
        secs: u64,
    },
    /// Data path in the lab: 4 GiB of raw page frames per send mode (std, uring, zero-copy,
    /// zero-copy-fixed) with 1 and 2 streams against the raw TCP blast, then a 2 GiB random
    /// guest's migration against the blast (table, and target/bench/transport.jsonl).
    Transport {
        /// GiB per measurement.
        #[arg(long, default_value_t = 4)]
        gib: u64,
    },
    /// Live migration a→b in the lab of a mixed 2-vCPU guest at several dirty rates: total time,
    /// downtime, guest-observed pause, rounds, bytes (table, and target/bench/migrate.jsonl).
    Migrate {
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 4096)]
        memory_mib: u64,
        /// Dirty rates in MiB/s, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "0,64")]
        rates: Vec<u64>,
        /// Migrations per rate.
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        /// Also migrate each with encrypted page streams, next to the plain runs.
        #[arg(long)]
        encrypt: bool,
    },
    /// The migration matrix in the lab, next to the raw link measured in the same run: memory x
    /// content x dirty rate x streams x compression x zero-copy; a table, JSON lines, markdown,
    /// SVG plots in target/bench/, and the goals met or missed. `--quick`: a subset, < 2 min.
    Matrix(MatrixArgs),
    /// What a guest's users see (release build): the service guest with a NIC and a disk, a
    /// client pinging it every 10 ms and reading its TCP stream; per scenario (idle, dirtying 64
    /// MiB/s, journaling) and migration: pings lost, largest ping gap, largest TCP stall,
    /// downtime, device state (table, and target/bench/continuity.jsonl).
    Continuity {
        /// Migrations per scenario.
        #[arg(long, default_value_t = 3)]
        moves: u32,
    },
}

#[derive(Debug, clap::Args)]
struct MatrixArgs {
    /// The small subset behind the key ratios (overrides the dimensions below)
    #[arg(long)]
    quick: bool,
    /// Guest memory in MiB
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    memory: Vec<u64>,
    /// Guest memory content: zero, random, text, mixed
    #[arg(long, value_delimiter = ',', default_value = "zero,random,text,mixed")]
    profiles: Vec<String>,
    /// Dirty rates in MiB/s; `fast` = unpaced (faster than the link)
    #[arg(long, value_delimiter = ',', default_value = "0,64,256,fast")]
    rates: Vec<String>,
    /// Data streams
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    streams: Vec<u32>,
    /// Compression: on, off
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    compress: Vec<String>,
    /// Zero-copy sends: on, off
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    zero_copy: Vec<String>,
    /// Encryption: on (the default where the cluster key is configured, as in the lab), off
    #[arg(long, value_delimiter = ',', default_value = "on")]
    encrypt: Vec<String>,
    /// Migration link shapes (tc on both hosts' migration NIC): none, 10gbit, 1gbit, 500mbit…
    #[arg(long, value_delimiter = ',', default_value = "none")]
    link: Vec<String>,
    /// Page codecs: auto (the default: chosen per stream from measured rates), none, lz4, zstd
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    codec: Vec<String>,
    /// Label for the output files (target/bench/matrix-LABEL.*)
    #[arg(long, default_value = "current")]
    label: String,
    /// The ferry binary under test [default: this tree's build]
    #[arg(long)]
    ferry_bin: Option<std::path::PathBuf>,
    /// A/B: run the same cells with this other build too (label "b"), then compare
    #[arg(long)]
    compare_bin: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum LabAction {
    /// Build the lab and start one agent per host; it keeps running after this command.
    Up(UpArgs),
    /// Stop the agents, delete the namespaces and remove the lab root.
    Down(LabTarget),
    /// Show namespaces, agents, sockets and addresses.
    Status {
        #[command(flatten)]
        target: LabTarget,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which lab.
#[derive(Debug, Args)]
struct LabTarget {
    /// Lab name (namespaces ferry-NAME-a, -b, -sw); default "lab" (for down and status: the
    /// name recorded at --root, if any).
    #[arg(long)]
    name: Option<String>,
    /// Lab root directory (datastores, configs, sockets, logs, lab.json).
    #[arg(long, default_value = lab::DEFAULT_ROOT)]
    root: PathBuf,
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    target: LabTarget,
    /// The ferry binary for the agents; default: $FERRY_BIN, else `ferry` next to this xtask.
    #[arg(long, conflicts_with = "no_agents")]
    ferry_bin: Option<PathBuf>,
    /// Build the network and directories only; start no agents.
    #[arg(long)]
    no_agents: bool,
    /// Remove an existing lab of this name/root first.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {err}");
            for cause in err.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Lab { action } => match action {
            LabAction::Up(args) => lab_up(args),
            LabAction::Down(target) => lab_down(&target),
            LabAction::Status { target, json } => lab_status(&target, json),
        },
        Command::Deps { check: false } => xtask::dev::deps(),
        Command::Deps { check: true } => xtask::dev::check_deps(),
        Command::BuildEbpf { check } => xtask::dev::build_ebpf(check),
        Command::BuildGuest { check } => xtask::guest::build_guest(check),
        Command::Test { packaging, args } => {
            if packaging {
                if !args.is_empty() {
                    bail!("--packaging takes no other arguments (got {args:?})");
                }
                xtask::packaging::run()
            } else {
                xtask::dev::test(&args)
            }
        }
        Command::Demo => xtask::dev::demo(),
        Command::Dist { version_suffix } => xtask::dist::dist(&version_suffix).map(|_| ()),
        Command::Bench { what } => match what {
            BenchWhat::Guest { secs } => xtask::dev::bench_guest(secs),
            BenchWhat::Transport { gib } => xtask::dev::bench_transport(gib),
            BenchWhat::Migrate {
                memory_mib,
                rates,
                repeat,
                encrypt,
            } => xtask::dev::bench_migrate(memory_mib, &rates, repeat, encrypt),
            BenchWhat::Matrix(m) => bench_matrix(m),
            BenchWhat::Continuity { moves } => xtask::continuity::bench(moves),
        },
    }
}

fn bench_matrix(m: MatrixArgs) -> Result<()> {
    use xtask::matrix::{MatrixSpec, FAST};
    let onoff = |v: &[String], what: &str| -> Result<Vec<bool>> {
        v.iter()
            .map(|s| match s.as_str() {
                "on" => Ok(true),
                "off" => Ok(false),
                o => anyhow::bail!("--{what}: {o:?} is neither on nor off"),
            })
            .collect()
    };
    let bin = match m.ferry_bin {
        Some(b) => b,
        None => xtask::dev::build_ferry_release()?,
    };
    let mut spec = if m.quick {
        MatrixSpec::quick(bin, m.label.clone())
    } else {
        MatrixSpec {
            memory_mib: m.memory,
            profiles: m
                .profiles
                .iter()
                .map(|p| {
                    serde_json::from_value(serde_json::Value::String(p.clone())).map_err(|_| {
                        anyhow::anyhow!("--profiles: {p:?} is not one of zero, random, text, mixed")
                    })
                })
                .collect::<Result<_>>()?,
            rates: m
                .rates
                .iter()
                .map(|r| match r.as_str() {
                    "fast" => Ok(FAST),
                    r => r
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--rates: {r:?} is not MiB/s or `fast`")),
                })
                .collect::<Result<_>>()?,
            streams: m.streams,
            compress: onoff(&m.compress, "compress")?,
            zero_copy: onoff(&m.zero_copy, "zero-copy")?,
            encrypt: onoff(&m.encrypt, "encrypt")?,
            links: m
                .link
                .iter()
                .map(|l| xtask::matrix::parse_link(l))
                .collect::<Result<_>>()?,
            codecs: m
                .codec
                .iter()
                .map(|c| {
                    c.parse()
                        .map_err(|e: ferry::migrate::OptionError| anyhow::anyhow!("--codec: {e}"))
                })
                .collect::<Result<_>>()?,
            shaped_mixed_only: false,
            label: m.label.clone(),
            ferry_bin: bin,
        }
    };
    let a = xtask::matrix::run(&spec)?;
    if let Some(other) = m.compare_bin {
        spec.ferry_bin = other;
        spec.label = format!("{}-vs", m.label);
        let b = xtask::matrix::run(&spec)?;
        xtask::matrix::compare(&a, &b)?;
    }
    Ok(())
}

fn lab_up(args: UpArgs) -> Result<()> {
    let root = absolute(&args.target.root)?;
    let name = args
        .target
        .name
        .clone()
        .unwrap_or_else(|| lab::DEFAULT_NAME.to_owned());
    let existing = lab::status(Some(&name), &root)?;
    if existing.exists() {
        if !args.force {
            bail!(
                "lab `{name}` already exists at {}:\n{existing}run `cargo xtask lab down` first, \
                 or `cargo xtask lab up --force` to recreate it",
                root.display()
            );
        }
        let report = lab::down_recorded(Some(&name), &root)
            .context("cannot remove the existing lab (--force)")?;
        say!(
            "removed the existing lab `{name}` ({} namespaces, {} agents)",
            report.deleted_namespaces.len(),
            report.stopped_agents.len()
        );
    }
    let ferry_bin = if args.no_agents {
        None
    } else {
        Some(match args.ferry_bin {
            Some(bin) => bin,
            None => lab::ferry_bin()
                .context("no agents can be started; pass --no-agents to build the network only")?,
        })
    };
    let lab = Lab::up(LabOptions {
        name: name.clone(),
        root: root.clone(),
        ferry_bin,
    })?;
    let state = lab.detach();
    state.save()?;
    say!("lab `{name}` is up at {}", root.display());
    say!(
        "{}",
        lab::status(Some(&name), &root)?.to_string().trim_end()
    );
    say!("remove it with `cargo xtask lab down`");
    Ok(())
}

fn lab_down(target: &LabTarget) -> Result<()> {
    let root = absolute(&target.root)?;
    let report = lab::down_recorded(target.name.as_deref(), &root)?;
    for note in &report.notes {
        say!("note: {note}");
    }
    if report.nothing_found() {
        say!(
            "no lab `{}` at {}: nothing to remove",
            report.name,
            root.display()
        );
        return Ok(());
    }
    for (host, pid) in &report.stopped_agents {
        say!("stopped the agent of host {host} (pid {pid})");
    }
    for (netns, pid) in &report.stopped_processes {
        say!("stopped pid {pid}, still running in {netns}");
    }
    if !report.deleted_namespaces.is_empty() {
        say!(
            "deleted namespaces {}",
            report.deleted_namespaces.join(", ")
        );
    }
    if report.removed_root {
        say!("removed {}", root.display());
    }
    Ok(())
}

fn lab_status(target: &LabTarget, json: bool) -> Result<()> {
    let root = absolute(&target.root)?;
    let status = lab::status(target.name.as_deref(), &root)?;
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&status).context("cannot serialize the status")?
        );
    } else {
        say!("{}", status.to_string().trim_end());
    }
    Ok(())
}

/// `path` made absolute against the current directory.
fn absolute(path: &std::path::Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}
