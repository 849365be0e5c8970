//! The `ferry` command line. `ferry agent` runs the daemon; every other command is a client of
//! a running agent's API.
//!
//! Which agent: `--socket PATH` (or `FERRY_SOCKET`), else `--host NAME` (or `FERRY_HOST`) for a
//! host of the two-host lab (`cargo xtask lab up`), whose socket is
//! `$FERRY_LAB_ROOT/NAME/agent.sock` (default root `/run/ferry/lab`), else
//! `/run/ferry/agent.sock`.
//!
//! Exit codes: 0 success; 1 the agent refused or the operation failed (the message says why);
//! 2 bad command line or request (the input itself is wrong: the agent answered 400);
//! 3 the agent cannot be reached; 4 `ferry ping` lost some probes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::checks::cpu::CpuPolicy;
use crate::checks::ping::PingReport;
use crate::checks::CheckReport;
use crate::control::agent::Baseline;
use crate::control::agent::PingRequest;
use crate::control::agent::{
    ConsoleChunk, HostInfo, MigrateRequest, SaveOutcome, VerifyOutcome, VmInfo, VmSummary,
};
use crate::control::api::{CreateRequest, RestoreRequest, SaveRequest};
use crate::control::client::{Client, ClientError};
use crate::control::config::{Config, DEFAULT_CONFIG, DEFAULT_SOCKET};
use crate::migrate::blast::{BlastMode, BlastRequest, BlastResult};
use crate::migrate::{MigrateOptions, MigrationRecord, Phase};
use crate::netpin::StatsReport;
use crate::vm::{DiskSpec, GuestKind, NicSpec, Profile, RawMode, RawParams, WorkloadParams};

/// Default root of the lab made by `cargo xtask lab up`.
pub const DEFAULT_LAB_ROOT: &str = "/run/ferry/lab";

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: run KVM guests on this host and live-migrate them between hosts",
    long_about = "Ferry runs KVM guests on this host and live-migrates them between hosts.\n\n\
`ferry agent` runs the host agent (normally as the systemd service `ferry-agent`); every other \
command talks to a running agent over its unix socket.\n\n\
Exit codes: 0 success, 1 the request was refused or failed, 2 bad command line or request (the \
input itself is wrong), 3 the agent cannot be reached, 4 `ferry ping` lost some probes."
)]
pub struct Cli {
    /// Agent API socket [default: /run/ferry/agent.sock]
    #[arg(long, global = true, env = "FERRY_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Talk to the agent of lab host NAME (see `cargo xtask lab up`)
    #[arg(long, global = true, env = "FERRY_HOST", value_name = "NAME")]
    pub host: Option<String>,
    /// Print machine-readable JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host agent (the daemon)
    Agent(AgentArgs),
    /// Show the agent's host: KVM facts, memory, VMs
    Host,
    /// Create, run, inspect, save and restore VMs
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a running VM to a peer agent (or cancel a migration)
    Migrate(MigrateArgs),
    /// List running and past migrations, or show one
    Migrations {
        /// A migration id (m-...)
        id: Option<String>,
    },
    /// Probe the migration link to a peer, like vmkping: ICMP echo from the migration address
    /// through the migration NIC (RTT, loss, path MTU); `--throughput` blasts data instead
    Ping(PingArgs),
    /// Link utilization per interface and class (migration / other) and pinning counters (eBPF)
    Stats {
        /// Refresh every second until interrupted
        #[arg(long, short)]
        watch: bool,
    },
    /// Check whether a VM can migrate to a peer: CPU, datastores, port groups, link, room
    Check {
        vm: String,
        /// The peer: a name from [peers] or a management address
        #[arg(long, value_name = "PEER")]
        to: String,
    },
    /// CPU features
    #[command(subcommand)]
    Cpu(CpuCommand),
    /// Disk locks on the datastores
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Run one guest in a VMM process of its own (internal: the agent starts it)
    #[command(hide = true)]
    Vmm(crate::vmm::VmmArgs),
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Break a stale disk lock: its holder's host stopped renewing its lease (crashed or cut
    /// off). Refused while that host is alive. Make sure the guest really is gone there first.
    Unlock {
        /// The disk, e.g. "[shared] dk/dk.img"
        disk: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CpuCommand {
    /// The CPU baseline common to this host and the given peers
    Baseline {
        #[arg(required = true)]
        peers: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct PingArgs {
    /// The peer: a name from [peers] or a management address
    pub peer: String,
    /// Send for this many seconds and report the rate
    #[arg(long, value_name = "SECS")]
    pub throughput: Option<f64>,
    /// Parallel streams
    #[arg(long, default_value_t = 1)]
    pub streams: u32,
    /// tcp (raw TCP blast), or Ferry page frames sent with std, uring, zero-copy, zero-copy-fixed
    #[arg(long, default_value = "tcp")]
    pub mode: String,
    /// Send this many bytes instead of for a time, e.g. 4G
    #[arg(long, value_parser = parse_size_mib, value_name = "SIZE")]
    pub bytes: Option<u64>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM to move
    #[arg(required_unless_present = "cancel")]
    pub vm: Option<String>,
    /// The peer: a name from the config's [peers] or a management address
    #[arg(long, required_unless_present = "cancel", value_name = "PEER")]
    pub to: Option<String>,
    /// Cancel the running migration ID instead (the guest stays on the source)
    #[arg(long, value_name = "ID", conflicts_with_all = ["vm", "to"])]
    pub cancel: Option<String>,
    /// Return at once with the migration id instead of showing progress
    #[arg(long)]
    pub detach: bool,
    /// Compare a digest of all guest memory at the pause with the destination's before it resumes
    #[arg(long)]
    pub verify: bool,
    /// Parallel data streams, 1 to 64 [default: one per core, at most 4]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub streams: Option<u32>,
    /// Downtime target in milliseconds [default: 5]
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<f64>,
    /// Give up after this many seconds [default: 300]
    #[arg(long, value_name = "SECS")]
    pub max_time: Option<f64>,
    /// Give up after this many rounds [default: no limit]
    #[arg(long, value_name = "N")]
    pub max_rounds: Option<u32>,
    /// Do not throttle a guest whose rounds stop shrinking
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Delta cache size in percent of guest memory [default: 5]
    #[arg(long, value_name = "PERCENT")]
    pub cache_percent: Option<f64>,
    /// How data streams send: zero-copy-fixed (default; falls back to uring where the kernel
    /// copies), zero-copy, uring, std
    #[arg(long, value_name = "MODE")]
    pub send_mode: Option<String>,
    /// Overwrite send buffers when released (tests)
    #[arg(long, hide = true)]
    pub poison_buffers: bool,
    /// Go ahead despite warnings from the pre-migration checks (never despite failures)
    #[arg(long)]
    pub force: bool,
    /// Encrypt this migration even where `[migration] encrypt = "off"` (AES-256-GCM; needs the
    /// cluster key). By default (`preferred`) migrations are encrypted whenever the cluster key
    /// is configured
    #[arg(long, conflicts_with = "no_encrypt")]
    pub encrypt: bool,
    /// Send this migration in the clear (refused where encryption is required)
    #[arg(long)]
    pub no_encrypt: bool,
    /// Send pages raw (zero pages still skipped): no compression, no deltas (overrides --codec)
    #[arg(long)]
    pub no_compress: bool,
    /// Page codec: auto (each stream picks none, lz4 or zstd from the rates it measures during
    /// the migration), none, lz4, zstd
    #[arg(long, default_value = "auto", value_parser = parse_codec)]
    pub codec: crate::migrate::tune::CodecChoice,
}

fn parse_codec(s: &str) -> Result<crate::migrate::tune::CodecChoice, String> {
    s.parse()
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines
    Text,
    /// One JSON object per line
    Json,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Configuration file [default: /etc/ferry/agent.toml; missing = all defaults]
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format (logs go to stderr; filter with FERRY_LOG or RUST_LOG, default "info")
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Only check the configuration and exit
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Subcommand)]
// Parsed once per run; the create arguments' size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum VmCommand {
    /// Create a VM (and start it with --start)
    Create(CreateArgs),
    /// List VMs
    #[command(visible_alias = "ls")]
    List,
    /// Show a VM: state, heartbeats, dirty rate, exits
    Inspect { name: String },
    /// Start a VM (a stopped or crashed VM boots afresh)
    Start { name: String },
    /// Pause a running VM
    Pause { name: String },
    /// Resume a paused VM
    Resume { name: String },
    /// Power a VM off (it stays defined)
    Stop { name: String },
    /// Stop a VM and forget it
    #[command(visible_alias = "rm")]
    Destroy { name: String },
    /// Print a VM's serial console
    Console {
        name: String,
        /// Keep printing new output (until Ctrl-C or the VM goes away)
        #[arg(long, short)]
        follow: bool,
    },
    /// Save a VM to a directory (memory as raw files + state); a running VM pauses briefly
    Save {
        name: String,
        /// Directory to write (created; must not hold a save already)
        dir: PathBuf,
    },
    /// Restore a VM from a directory written by `vm save`
    Restore {
        dir: PathBuf,
        /// Name of the restored VM [default: the saved name]
        #[arg(long)]
        name: Option<String>,
        /// Leave it paused instead of resuming it
        #[arg(long)]
        paused: bool,
    },
    /// CRC-32C of a paused VM's whole memory
    Digest { name: String },
    /// Check a paused workload VM's memory page by page against its heartbeats
    Verify { name: String },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    /// The built-in CPL3 workload guest
    Workload,
    /// A flat binary image
    Raw,
    /// The Rust service guest: virtio NIC and disk, echo, counter stream, disk journal
    Service,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProfileArg {
    Zero,
    Random,
    Text,
    Mixed,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RawModeArg {
    /// 16-bit real mode at --entry CS:IP
    Real,
    /// 64-bit long mode at CPL3, entered at the load address
    LongUser,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name (letters, digits, '.', '_', '-')
    pub name: String,
    /// Memory, e.g. 1G, 512M (plain numbers are MiB)
    #[arg(long, short, default_value = "1G", value_parser = parse_size_mib)]
    pub memory: u64,
    /// Number of vCPUs
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// What the guest runs
    #[arg(long, value_enum, default_value = "workload")]
    pub kind: KindArg,
    /// Workload: content profile of its memory
    #[arg(long, value_enum, default_value = "mixed")]
    pub profile: ProfileArg,
    /// Workload, service: MiB/s of memory re-written after the initial fill (0 = idle)
    #[arg(long, default_value_t = 0, value_name = "MIB_PER_S")]
    pub dirty_rate: u64,
    /// Workload, service: size of the re-written working set, e.g. 256M [workload default: all
    /// memory; service default: none]
    #[arg(long, value_parser = parse_size_mib, value_name = "SIZE")]
    pub working_set: Option<u64>,
    /// Service: the guest's IPv4 address and prefix, e.g. 198.18.2.10/24
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub ip: Option<String>,
    /// Service: default gateway
    #[arg(long, value_name = "ADDR")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Service: journal records appended and flushed per second (0 = no journal)
    #[arg(long, default_value_t = 0, value_name = "PER_S")]
    pub journal_rate: u32,
    /// Service: program image to run instead of the one built into the agent
    #[arg(long, value_name = "FILE")]
    pub program: Option<PathBuf>,
    /// Raw: the image file
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Raw: how the image starts
    #[arg(long, value_enum, default_value = "real")]
    pub mode: RawModeArg,
    /// Raw: guest-physical load address (default 0x7c00, or 0x400000 in long-user mode)
    #[arg(long, value_parser = parse_u64, value_name = "ADDR")]
    pub load_addr: Option<u64>,
    /// Raw, real mode: entry point CS:IP in hex
    #[arg(long, default_value = "0000:7c00", value_parser = parse_entry, value_name = "CS:IP")]
    pub entry: (u16, u16),
    /// A disk on a datastore, "[datastore] dir/file.img:SIZE" (created sparse if missing; repeat
    /// for more)
    #[arg(long, value_name = "PATH:SIZE")]
    pub disk: Vec<String>,
    /// A NIC on a port group: "PORT_GROUP" (MAC derived from the VM name) or "MAC@PORT_GROUP"
    #[arg(long, value_name = "[MAC@]PORT_GROUP")]
    pub nic: Vec<String>,
    /// CPU model the guest sees: host, x86-64-v1 .. x86-64-v4
    #[arg(long, default_value = "host", value_name = "MODEL")]
    pub cpu_model: String,
    /// CPU features hidden from the guest (names like avx512f, or leaf:subleaf:reg:bit)
    #[arg(long, value_delimiter = ',', value_name = "FEATURE,...")]
    pub cpu_mask: Vec<String>,
    /// Start it right away
    #[arg(long)]
    pub start: bool,
}

/// A stable, locally administered MAC for NIC `i` of VM `name`.
pub fn derived_mac(name: &str, i: usize) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes().chain([i as u8]) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

fn parse_disks(args: &[String]) -> Result<Vec<DiskSpec>, Failure> {
    args.iter()
        .map(|d| {
            let (path, size) = d.rsplit_once(':').ok_or_else(|| Failure {
                code: 2,
                message: format!("--disk {d:?}: write \"[datastore] dir/file.img:SIZE\""),
            })?;
            let size_mib = parse_size_mib(size).map_err(|m| Failure {
                code: 2,
                message: m,
            })?;
            Ok(DiskSpec {
                path: path.trim().to_string(),
                size_mib,
            })
        })
        .collect()
}

fn parse_nics(vm: &str, args: &[String]) -> Vec<NicSpec> {
    args.iter()
        .enumerate()
        .map(|(i, n)| match n.split_once('@') {
            Some((mac, pg)) => NicSpec {
                mac: mac.to_ascii_lowercase(),
                port_group: pg.to_string(),
            },
            None => NicSpec {
                mac: derived_mac(vm, i),
                port_group: n.to_string(),
            },
        })
        .collect()
}

/// Parse "1G", "512M", "2GiB", "1024" (MiB) into MiB.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower
        .strip_suffix("gib")
        .or_else(|| lower.strip_suffix("gb"))
        .or_else(|| lower.strip_suffix('g'))
    {
        (n, 1024)
    } else if let Some(n) = lower
        .strip_suffix("mib")
        .or_else(|| lower.strip_suffix("mb"))
        .or_else(|| lower.strip_suffix('m'))
    {
        (n, 1)
    } else if let Some(n) = lower
        .strip_suffix("tib")
        .or_else(|| lower.strip_suffix("tb"))
        .or_else(|| lower.strip_suffix('t'))
    {
        (n, 1024 * 1024)
    } else {
        (lower.as_str(), 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{t:?} is not a size; write e.g. 1G, 512M or 1024 (MiB)"))
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{t:?} is not a number (decimal or 0x-hex)"))
}

fn parse_entry(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not CS:IP in hex, e.g. 0000:7c00");
    let (cs, ip) = s.split_once(':').ok_or_else(bad)?;
    Ok((
        u16::from_str_radix(cs, 16).map_err(|_| bad())?,
        u16::from_str_radix(ip, 16).map_err(|_| bad())?,
    ))
}

/// A failed command: message and exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::Connect { .. } => 3,
            // The agent found the request itself malformed or invalid: the input is wrong (a
            // host without room for a valid request is a refusal, 1).
            ClientError::Api {
                status: 400,
                ref code,
                ..
            } if code != "no_room" => 2,
            _ => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(2),
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ferry: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn socket_path(cli: &Cli) -> PathBuf {
    if let Some(s) = &cli.socket {
        return s.clone();
    }
    if let Some(h) = &cli.host {
        let root = std::env::var_os("FERRY_LAB_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LAB_ROOT));
        return root.join(h).join("agent.sock");
    }
    PathBuf::from(DEFAULT_SOCKET)
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Agent(a) => run_agent(a),
        Command::Vmm(a) => crate::vmm::run(a).map_err(|e| fail(e.to_string())),
        Command::Host => {
            let c = Client::new(socket_path(&cli));
            let h: HostInfo = c.get("/v1/host")?;
            out(&cli, &h, |h| {
                format!(
                    "host:       {}\nversion:    {}\nTSC:        {} kHz ({})\nMSRs saved: {}\nmemory:     {} MiB total, {} MiB available, {} MiB promised to VMs, {} MiB reserved for the host\nVMs:        {}\n",
                    h.name,
                    h.version,
                    h.tsc_khz,
                    if h.tsc_settable { "guest TSC restorable" } else { "guest TSC follows the host" },
                    h.msrs,
                    h.memory_total_mib,
                    h.memory_available_mib,
                    h.memory_committed_mib,
                    h.memory_reserve_mib,
                    h.vms
                )
            });
            Ok(())
        }
        Command::Vm(v) => run_vm(&cli, v),
        Command::Migrate(m) => run_migrate(&cli, m),
        Command::Ping(p) => run_ping(&cli, p),
        Command::Stats { watch } => run_stats(&cli, *watch),
        Command::Check { vm, to } => {
            let c = Client::new(socket_path(&cli));
            let r: CheckReport = c.get(&vm_path(vm, &format!("/check?to={}", enc(to))))?;
            out(&cli, &r, human_check);
            if r.passed {
                Ok(())
            } else {
                Err(fail(format!("{vm} cannot migrate to {to}")))
            }
        }
        Command::Disk(DiskCommand::Unlock { disk }) => {
            let c = Client::new(socket_path(&cli));
            let h: crate::checks::disklock::LockHolder =
                c.post("/v1/disks/unlock", &serde_json::json!({ "disk": disk }))?;
            out(&cli, &h, |h| {
                format!(
                    "unlocked {disk}: it was held by guest {} on host {} (last heartbeat {})\n",
                    h.vm,
                    h.host,
                    h.heartbeat_age_s
                        .map_or("never".to_string(), |a| format!("{a} s ago"))
                )
            });
            Ok(())
        }
        Command::Cpu(CpuCommand::Baseline { peers }) => {
            let c = Client::new(socket_path(&cli));
            let b: Baseline = c.post("/v1/cpu/baseline", &serde_json::json!({ "peers": peers }))?;
            out(&cli, &b, |b| {
                format!(
                    "hosts:      {}\nlevel:      {}\ncommon:     {}\nmask these: {}\n",
                    b.hosts.join(", "),
                    b.level.as_deref().unwrap_or("(below x86-64-v1)"),
                    b.common.join(" "),
                    if b.mask.is_empty() {
                        "(nothing: all hosts offer the same)".to_string()
                    } else {
                        b.mask.join(",")
                    }
                )
            });
            Ok(())
        }
        Command::Migrations { id } => {
            let c = Client::new(socket_path(&cli));
            match id {
                Some(id) => {
                    let r: MigrationRecord = c.get(&format!("/v1/migrations/{}", enc(id)))?;
                    out(&cli, &r, human_record);
                }
                None => {
                    let l: Vec<MigrationRecord> = c.get("/v1/migrations")?;
                    out(&cli, &l, |l| {
                        let mut s = format!(
                            "{:<12} {:<4} {:<16} {:<16} {:<10} {:>8} {:>10} {:>6}  {}\n",
                            "ID",
                            "DIR",
                            "VM",
                            "PEER",
                            "PHASE",
                            "TIME",
                            "DOWNTIME",
                            "ROUND",
                            "RESULT"
                        );
                        for r in l {
                            let down = r
                                .summary
                                .as_ref()
                                .filter(|_| r.direction == "out")
                                .map(|s| format!("{:.1} ms", s.downtime.total_ms))
                                .unwrap_or_else(|| "-".into());
                            s += &format!(
                                "{:<12} {:<4} {:<16} {:<16} {:<10} {:>7.1}s {:>10} {:>6}  {}\n",
                                r.id,
                                r.direction,
                                r.vm,
                                peer_name(&r.peer),
                                format!("{:?}", r.phase).to_lowercase(),
                                r.elapsed_s,
                                down,
                                r.summary
                                    .as_ref()
                                    .map_or(r.round, |s| s.rounds.len() as u32),
                                r.error
                                    .as_deref()
                                    .unwrap_or(if r.phase == Phase::Completed {
                                        "ok"
                                    } else {
                                        ""
                                    })
                            );
                        }
                        s
                    });
                }
            }
            Ok(())
        }
    }
}

/// A migration's peer for the table: its name without the address ("b (198.18.0.2:46…)" → "b"),
/// at most 16 characters, never cut mid-address.
fn peer_name(peer: &str) -> String {
    let name = peer.split_once(" (").map_or(peer, |(n, _)| n);
    if name.chars().count() <= 16 {
        name.to_string()
    } else {
        name.chars().take(15).chain(std::iter::once('…')).collect()
    }
}

fn bits(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} Gbit/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} Mbit/s", b / 1e6)
    } else {
        format!("{:.0} kbit/s", b / 1e3)
    }
}

fn human_stats(r: &StatsReport) -> String {
    if !r.available {
        return format!(
            "eBPF link statistics and pinning are unavailable: {}\n",
            r.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    let mut s = format!(
        "{:<10} {:>12} {:>3} {:>15} {:>7} {:>15} {:>15} {:>7} {:>15}\n",
        "INTERFACE", "SPEED", "", "TX MIGRATION", "%", "TX OTHER", "RX MIGRATION", "%", "RX OTHER"
    );
    for i in &r.interfaces {
        let pct = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.1}"));
        s += &format!(
            "{:<10} {:>12} {:>3} {:>15} {:>7} {:>15} {:>15} {:>7} {:>15}\n",
            i.name,
            i.speed_bps.map_or("?".to_string(), |b| bits(b as f64)),
            if i.migration { "mig" } else { "" },
            bits(i.tx.migration.bits_per_s),
            pct(i.tx.migration.percent),
            bits(i.tx.other.bits_per_s),
            bits(i.rx.migration.bits_per_s),
            pct(i.rx.migration.percent),
            bits(i.rx.other.bits_per_s),
        );
    }
    let p = &r.pinning;
    s += &format!(
        "pinning {} (mark {:#x}{}): {} packets redirected to the migration NIC, {} leaked, {} dropped as not migration\n",
        if p.enabled { "on" } else { "off" },
        p.mark,
        if p.dedicated { ", dedicated" } else { "" },
        p.redirected_packets,
        p.leaked_packets,
        p.dedicated_dropped_packets
    );
    s
}

fn run_stats(cli: &Cli, watch: bool) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    loop {
        let r: StatsReport = c.get("/v1/stats")?;
        if cli.json && watch {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            if watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                print!("\x1b[2J\x1b[H");
            }
            out(cli, &r, human_stats);
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn human_check(r: &CheckReport) -> String {
    let mut s = format!("{:<16} {:<8} {}\n", "REQUIREMENT", "RESULT", "DETAIL (FIX)");
    for i in &r.items {
        s += &format!(
            "{:<16} {:<8} {}{}\n",
            i.requirement,
            format!("{:?}", i.result).to_lowercase(),
            i.detail,
            i.fix
                .as_ref()
                .map(|f| format!(" (fix: {f})"))
                .unwrap_or_default()
        );
    }
    s += &format!(
        "{} {} migrate to {}{}\n",
        r.vm,
        if r.passed { "can" } else { "cannot" },
        r.peer,
        if r.warnings > 0 {
            format!(
                " ({} warning{}: ferry migrate needs --force)",
                r.warnings,
                if r.warnings == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        }
    );
    s
}

fn run_icmp_ping(cli: &Cli, peer: &str) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    let r: PingReport = c.post("/v1/ping", &serde_json::json!({ "to": peer }))?;
    out(cli, &r, |r| {
        let mut s = format!(
            "{} -> {} via {}: {} sent, {} received, {:.0} % loss",
            r.local,
            r.remote,
            r.interface.as_deref().unwrap_or("any NIC"),
            r.sent,
            r.received,
            r.loss_percent
        );
        if let (Some(a), Some(b), Some(c)) = (r.rtt_min_ms, r.rtt_avg_ms, r.rtt_max_ms) {
            s += &format!(", rtt min/avg/max {a:.3}/{b:.3}/{c:.3} ms");
        }
        s.push('\n');
        for m in &r.mtu {
            s += &format!(
                "  {} bytes, don't fragment: {} ({})\n",
                m.size,
                if m.ok { "passes" } else { "fails" },
                m.detail
            );
        }
        s
    });
    match r.received {
        0 => Err(fail(format!(
            "no reply from {} over the migration network",
            r.remote
        ))),
        n if n < r.sent => Err(Failure {
            code: 4,
            message: format!("{} of {} probes lost", r.sent - n, r.sent),
        }),
        _ => Ok(()),
    }
}

fn run_ping(cli: &Cli, p: &PingArgs) -> Result<(), Failure> {
    let usage = |m: String| Failure {
        code: 2,
        message: m,
    };
    let Some(secs) = p.throughput.or(p.bytes.map(|_| 0.0)) else {
        return run_icmp_ping(cli, &p.peer);
    };
    let mode: BlastMode = p.mode.parse().map_err(usage)?;
    let req = PingRequest {
        to: p.peer.clone(),
        throughput: Some(BlastRequest {
            streams: p.streams,
            secs,
            bytes: p.bytes.map_or(0, |m| m << 20),
            mode,
        }),
    };
    let c = Client::new(socket_path(cli));
    let r: BlastResult = c.post("/v1/ping", &req)?;
    out(cli, &r, |r| {
        format!(
            "{} -> {} ({:?}, {} stream{}): {:.2} GiB in {:.2} s = {:.2} GB/s ({:.1} Gbit/s); CPU per GiB: sender {:.2} s, receiver {:.2} s\n",
            r.local,
            r.remote,
            r.mode,
            r.streams,
            if r.streams == 1 { "" } else { "s" },
            r.bytes as f64 / (1u64 << 30) as f64,
            r.secs,
            r.gbytes_per_s,
            r.gbits_per_s,
            r.send_cpu_s_per_gib,
            r.recv_cpu_s_per_gib
        )
    });
    Ok(())
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn run_migrate(cli: &Cli, m: &MigrateArgs) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    if let Some(id) = &m.cancel {
        let r: MigrationRecord = c.post_empty(&format!("/v1/migrations/{}/cancel", enc(id)))?;
        out(cli, &r, |r| format!("cancelling {} ({})\n", r.id, r.vm));
        return Ok(());
    }
    let (Some(vm), Some(to)) = (&m.vm, &m.to) else {
        return Err(Failure {
            code: 2,
            message: "give the VM and --to PEER (or --cancel ID)".into(),
        });
    };
    let mut options = MigrateOptions {
        streams: m.streams.unwrap_or(0),
        verify: m.verify,
        encrypt: m.encrypt,
        no_encrypt: m.no_encrypt,
        compress: !m.no_compress,
        codec: m.codec,
        ..MigrateOptions::default()
    };
    if let Some(p) = m.cache_percent {
        options.cache_percent = p;
    }
    if let Some(d) = m.downtime_ms {
        options.policy.downtime_target_ms = d;
    }
    if let Some(t) = m.max_time {
        options.policy.max_time_s = t;
    }
    if let Some(r) = m.max_rounds {
        options.policy.max_rounds = r;
    }
    options.policy.auto_converge = !m.no_auto_converge;
    options.poison_buffers = m.poison_buffers;
    if let Some(mode) = &m.send_mode {
        options.send_mode = mode.parse().map_err(|e: String| Failure {
            code: 2,
            message: e,
        })?;
    }
    let started: MigrationRecord = c.post(
        "/v1/migrations",
        &MigrateRequest {
            vm: vm.clone(),
            to: to.clone(),
            options,
            force: m.force,
        },
    )?;
    if m.detach {
        out(cli, &started, |r| {
            format!(
                "migrating {} to {} as {} (follow it with `ferry migrations {}`)\n",
                r.vm, r.peer, r.id, r.id
            )
        });
        return Ok(());
    }
    let path = format!("/v1/migrations/{}", enc(&started.id));
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = std::time::Instant::now() - Duration::from_secs(10);
    // On a terminal: one live status line (indicatif); otherwise a line a second.
    let bar = (tty && !cli.json).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let rec = loop {
        let r: MigrationRecord = c.get(&path)?;
        if r.phase.finished() {
            break r;
        }
        if cli.json {
            println!(
                "{}",
                serde_json::json!({ "event": "progress", "migration": r })
            );
        } else if tty || last_line.elapsed() >= Duration::from_secs(1) {
            let line = format!(
                "{} {:<10} round {:<3} {:>9} pages left {:>9.1} MiB/s  ETA {:>6}  throttle {:>2} %  link {}",
                r.id,
                format!("{:?}", r.phase).to_lowercase(),
                r.round,
                r.pages_left,
                r.rate_mib_s,
                r.eta_s.map_or("-".into(), |e| format!("{e:.1}s")),
                r.throttle,
                r.link_percent.map_or("-".into(), |p| format!("{p:.0} %"))
            );
            match &bar {
                Some(b) => b.set_message(line),
                None => eprintln!("{line}"),
            }
            last_line = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if cli.json {
        println!(
            "{}",
            serde_json::json!({ "event": "result", "migration": rec })
        );
    } else {
        print!("{}", human_record(&rec));
    }
    if rec.phase == Phase::Completed {
        Ok(())
    } else {
        Err(fail(format!(
            "migration {} {}: {}",
            rec.id,
            format!("{:?}", rec.phase).to_lowercase(),
            rec.error.as_deref().unwrap_or("no reason given")
        )))
    }
}

/// Per stream: the page codec in force, how it was set, and the rates it was chosen from.
fn tuning_text(t: &[crate::migrate::tune::StreamTuning]) -> String {
    use crate::migrate::codec::Codec;
    let mut s = String::new();
    for st in t {
        let Some(codec) = st.codec else { continue };
        s += &format!(
            "  codec s{:<2}     {} ({}{})",
            st.stream,
            codec.name(),
            st.mode,
            if st.switches > 0 {
                format!(
                    ", {} change{}",
                    st.switches,
                    if st.switches == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            }
        );
        if let Some(r) = &st.rates {
            s += &format!(
                "; link {}",
                r.link_mb_s
                    .map_or("not limiting".into(), |l| format!("{l:.0} MB/s"))
            );
            for c in Codec::ALL {
                if let (Some(cr), Some(p)) = (r.codecs[c.index()], st.predicted_mb_s[c.index()]) {
                    if c == Codec::None {
                        s += &format!("; none -> {p:.0} MB/s");
                    } else {
                        s += &format!(
                            "; {} {:.0} MB/s x{:.2} -> {p:.0} MB/s",
                            c.name(),
                            cr.encode_mb_s,
                            cr.ratio
                        );
                    }
                }
            }
        }
        s.push('\n');
    }
    s
}

/// Pages, share and compression ratio per encoding, one line each.
fn encodings_text(e: &crate::migrate::EncodingStats) -> String {
    let all = e.pages().max(1);
    let mut s = String::new();
    for (i, (name, c)) in [
        ("zero", &e.zero),
        ("lz4", &e.lz4),
        ("zstd", &e.zstd),
        ("delta", &e.delta),
        ("raw", &e.raw),
    ]
    .into_iter()
    .enumerate()
    {
        let lead = if i == 0 {
            "  encodings     "
        } else {
            "                "
        };
        let share = c.pages as f64 * 100.0 / all as f64;
        let guest = c.pages * crate::migrate::codec::PAGE as u64;
        let what = if name == "zero" {
            "no payload".to_string()
        } else if c.pages == 0 {
            String::new()
        } else {
            format!(
                "{:>10} -> {:>10} on the wire ({:.1}x)",
                mib(guest),
                mib(c.bytes),
                guest as f64 / c.bytes.max(1) as f64
            )
        };
        s += &format!(
            "{lead}{name:<6}{:>9} pages ({share:>5.1} %)  {what}\n",
            c.pages
        );
    }
    s
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn human_record(r: &MigrationRecord) -> String {
    let mut s = String::new();
    let phase = format!("{:?}", r.phase).to_lowercase();
    match (&r.summary, r.phase) {
        (Some(sm), Phase::Completed) if r.direction == "out" => {
            let d = &sm.downtime;
            s += &format!(
                "migrated {} to {} in {:.2} s ({})\n",
                r.vm, r.peer, sm.total_s, r.id
            );
            s += &format!(
                "  downtime      {:.2} ms (final pages {:.2}, state {:.2}, prepare {:.2}, resume {:.2}{})\n",
                d.total_ms,
                d.final_pages_ms,
                d.state_ms,
                d.prepare_ms,
                d.resume_ms,
                if d.verify_ms > 0.0 {
                    format!("; of which --verify digests {:.2}", d.verify_ms)
                } else {
                    String::new()
                }
            );
            if let Some(p) = sm.guest_pause_ms {
                s += &format!("  guest pause   {p:.2} ms (largest heartbeat gap the guest saw)\n");
            }
            let pages: Vec<String> = sm.rounds.iter().map(|x| x.pages.to_string()).collect();
            s += &format!(
                "  rounds        {} (pages: {})\n",
                sm.rounds.len(),
                pages.join(", ")
            );
            let ratio = if sm.wire_bytes > 0 {
                sm.guest_bytes as f64 / sm.wire_bytes as f64
            } else {
                0.0
            };
            let skipped = sm.skipped_pages * crate::migrate::codec::PAGE as u64;
            s += &format!(
                "  memory        {} of guest pages over {} round{}: {} never touched or zero (skipped), {} sent as {} on the wire (ratio {:.1}x overall)\n",
                mib(sm.guest_bytes),
                sm.rounds.len(),
                if sm.rounds.len() == 1 { "" } else { "s" },
                mib(skipped),
                mib(sm.guest_bytes.saturating_sub(skipped)),
                mib(sm.wire_bytes),
                ratio,
            );
            s += &encodings_text(&sm.encodings);
            s += &format!(
                "  streams       {}, max throttle {} %\n",
                sm.streams, sm.max_throttle
            );
            s += &tuning_text(&sm.tuning);
            let t = &sm.transport;
            s += &format!(
                "  transport     {:?}: {} zero-copy, {} copied by the kernel, {} plain io_uring send, {} write(2){}\n",
                sm.send_mode,
                mib(t.zero_copy_bytes),
                mib(t.zc_copied_bytes),
                mib(t.uring_bytes),
                mib(t.std_bytes),
                if t.fell_back { " (the kernel copied zero-copy sends, so streams fell back to plain send)" } else { "" }
            );
            if let Some(l) = &sm.link {
                s += &format!(
                    "  link          migration NIC {} average, {} peak{}\n",
                    bits(l.avg_bits_per_s),
                    bits(l.peak_bits_per_s),
                    match (l.avg_percent, l.peak_percent, l.interface_speed_bps) {
                        (Some(a), Some(p), Some(sp)) =>
                            format!(" ({a:.0} % / {p:.0} % of {})", bits(sp as f64)),
                        _ => String::new(),
                    }
                );
            }
            if sm.devices != Default::default() {
                s += &format!(
                    "  devices       {} of virtio state; {} block request{} drained at the pause; {} frame{} for the guest carried, {} forwarded after the capture ({} dropped, {} ms window)\n",
                    if sm.devices.state_bytes < 1 << 20 {
                        format!("{} bytes", sm.devices.state_bytes)
                    } else {
                        mib(sm.devices.state_bytes)
                    },
                    sm.devices.io_drained,
                    if sm.devices.io_drained == 1 { "" } else { "s" },
                    sm.devices.rx_frames_carried,
                    if sm.devices.rx_frames_carried == 1 { "" } else { "s" },
                    sm.devices.rx_frames_forwarded,
                    sm.devices.rx_frames_forward_dropped,
                    sm.devices.forward_window_ms,
                );
            }
            s += &format!(
                "  encryption    {}\n",
                match (&sm.cipher, sm.encrypted) {
                    (Some(c), true) => format!("{c}: page streams and vCPU/device state"),
                    (None, true) => "AES-256-GCM: page streams and vCPU/device state".into(),
                    _ => "off: sent in the clear (no cluster key, --no-encrypt, or encrypt = \"off\")".into(),
                }
            );
            if sm.verified {
                s += &format!(
                    "  verified      memory digest equal ({})\n",
                    sm.digest.as_deref().unwrap_or("")
                );
            }
        }
        _ => {
            s += &format!(
                "{} {} {} {} {}: {} after {:.1} s, round {}\n",
                r.id,
                r.direction,
                r.vm,
                if r.direction == "out" { "to" } else { "from" },
                r.peer,
                phase,
                r.elapsed_s,
                r.round
            );
            if let Some(e) = &r.error {
                s += &format!("  reason: {e}\n");
            }
        }
    }
    s
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FERRY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd, stderr goes to the journal ($JOURNAL_STREAM), which stamps each line
    // itself: no second timestamp, no colours.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match (format, journal) {
        (LogFormat::Json, _) => b.json().try_init(),
        (LogFormat::Text, true) => b.without_time().try_init(),
        (LogFormat::Text, false) => b.try_init(),
    };
}

fn run_agent(a: &AgentArgs) -> Result<(), Failure> {
    let (path, explicit) = match &a.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let config = Config::load(&path, explicit).map_err(|e| Failure {
        code: 2,
        message: e.to_string(),
    })?;
    if a.check_config {
        println!("{}: configuration is valid", path.display());
        return Ok(());
    }
    init_logging(a.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the runtime: {e}")))?;
    rt.block_on(crate::control::daemon::run(config))
        .map_err(|e| fail(crate::control::error_chain(&e)))
}

fn out<T: Serialize>(cli: &Cli, v: &T, human: impl FnOnce(&T) -> String) {
    let text = if cli.json {
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
    } else {
        human(v)
    };
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

fn vm_path(name: &str, tail: &str) -> String {
    // Names are validated by the agent; escape anything that would break the path anyway.
    let enc: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/v1/vms/{enc}{tail}")
}

fn run_vm(cli: &Cli, cmd: &VmCommand) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    match cmd {
        VmCommand::Create(a) => {
            let req = create_request(a)?;
            let info: VmInfo = c.post("/v1/vms", &req)?;
            out(cli, &info, |i| {
                format!(
                    "created {} ({} MiB, {} vCPU{}, {}): {}\n",
                    i.name,
                    i.spec.memory_mib,
                    i.spec.vcpus,
                    if i.spec.vcpus == 1 { "" } else { "s" },
                    i.spec.kind.name(),
                    i.state
                )
            });
        }
        VmCommand::List => {
            let l: Vec<VmSummary> = c.get("/v1/vms")?;
            out(cli, &l, |l| {
                let mut s = format!(
                    "{:<24} {:<9} {:<9} {:>10} {:>6}\n",
                    "NAME", "STATE", "KIND", "MEMORY", "VCPUS"
                );
                for v in l {
                    s += &format!(
                        "{:<24} {:<9} {:<9} {:>6} MiB {:>6}\n",
                        v.name,
                        v.state.to_string(),
                        v.kind,
                        v.memory_mib,
                        v.vcpus
                    );
                }
                s
            });
        }
        VmCommand::Inspect { name } => {
            let i: VmInfo = c.get(&vm_path(name, ""))?;
            out(cli, &i, human_info);
        }
        VmCommand::Start { name } => action(cli, &c, name, "start", "started")?,
        VmCommand::Pause { name } => action(cli, &c, name, "pause", "paused")?,
        VmCommand::Resume { name } => action(cli, &c, name, "resume", "resumed")?,
        VmCommand::Stop { name } => action(cli, &c, name, "stop", "stopped")?,
        VmCommand::Destroy { name } => {
            c.delete(&vm_path(name, ""))?;
            out(cli, &serde_json::json!({ "destroyed": name }), |_| {
                format!("destroyed {name}\n")
            });
        }
        VmCommand::Console { name, follow } => console(cli, &c, name, *follow)?,
        VmCommand::Save { name, dir } => {
            let dir = absolute(dir)?;
            let r: SaveOutcome = c.post(&vm_path(name, "/save"), &SaveRequest { dir })?;
            out(cli, &r, |r| {
                format!(
                    "saved {name} to {} ({} MiB of memory, {} non-zero pages, state {} bytes; paused {} ms)\n",
                    r.report.dir.display(),
                    r.report.memory_bytes >> 20,
                    r.report.nonzero_pages,
                    r.report.state_bytes,
                    r.paused_ms
                )
            });
        }
        VmCommand::Restore { dir, name, paused } => {
            let dir = absolute(dir)?;
            let i: VmInfo = c.post(
                "/v1/restore",
                &RestoreRequest {
                    dir,
                    name: name.clone(),
                    paused: *paused,
                },
            )?;
            out(cli, &i, |i| format!("restored {}: {}\n", i.name, i.state));
        }
        VmCommand::Digest { name } => {
            let d: serde_json::Value = c.get(&vm_path(name, "/digest"))?;
            out(cli, &d, |d| {
                format!("{}\n", d["digest"].as_str().unwrap_or_default())
            });
        }
        VmCommand::Verify { name } => {
            let v: VerifyOutcome = c.post_empty(&vm_path(name, "/verify"))?;
            out(cli, &v, |v| {
                if v.ok {
                    format!(
                        "{name}: memory verified ({} pages, {} in flight at the pause)\n",
                        v.pages_checked, v.in_flight
                    )
                } else {
                    format!(
                        "{name}: {} of {} pages are wrong (first: {:?})\n",
                        v.bad_count, v.pages_checked, v.bad_pages
                    )
                }
            });
            if !v.ok {
                return Err(fail(format!("{name}: memory does not verify")));
            }
        }
    }
    Ok(())
}

fn absolute(p: &std::path::Path) -> Result<PathBuf, Failure> {
    std::path::absolute(p).map_err(|e| fail(format!("{}: {e}", p.display())))
}

/// Parse "A.B.C.D/N".
fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (ip, prefix) = s.split_once('/').ok_or_else(|| {
        format!("--ip {s:?}: write the address with its prefix, e.g. 198.18.2.10/24")
    })?;
    let ip = ip
        .parse()
        .map_err(|_| format!("--ip {s:?}: {ip:?} is not an IPv4 address"))?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("--ip {s:?}: {prefix:?} is not a prefix length (0-32)"))?;
    Ok((ip, prefix))
}

fn create_request(a: &CreateArgs) -> Result<CreateRequest, Failure> {
    let usage = |m: &str| Failure {
        code: 2,
        message: m.to_string(),
    };
    if a.kind != KindArg::Service
        && (a.ip.is_some() || a.gateway.is_some() || a.journal_rate != 0 || a.program.is_some())
    {
        return Err(usage(
            "--ip, --gateway, --journal-rate and --program are for --kind service",
        ));
    }
    let kind = match a.kind {
        KindArg::Service => {
            if a.image.is_some() {
                return Err(usage(
                    "--image is for --kind raw (a service guest takes --program)",
                ));
            }
            let ip = a.ip.as_deref().ok_or_else(|| {
                usage("--kind service needs --ip ADDR/PREFIX, e.g. 198.18.2.10/24")
            })?;
            let (ip, prefix_len) = parse_cidr(ip).map_err(|m| usage(&m))?;
            let u32_of = |v: u64, what: &str| {
                u32::try_from(v).map_err(|_| usage(&format!("{what} {v} is too large")))
            };
            GuestKind::Service(crate::vm::ServiceParams {
                ip,
                prefix_len,
                gateway: a.gateway,
                journal_rate: a.journal_rate,
                working_set_mib: u32_of(a.working_set.unwrap_or(0), "--working-set")?,
                dirty_rate_mib: u32_of(a.dirty_rate, "--dirty-rate")?,
                program: a.program.as_deref().map(absolute).transpose()?,
            })
        }
        KindArg::Workload => {
            if a.image.is_some() {
                return Err(Failure {
                    code: 2,
                    message: "--image is for --kind raw".into(),
                });
            }
            GuestKind::Workload(WorkloadParams {
                profile: match a.profile {
                    ProfileArg::Zero => Profile::Zero,
                    ProfileArg::Random => Profile::Random,
                    ProfileArg::Text => Profile::Text,
                    ProfileArg::Mixed => Profile::Mixed,
                },
                dirty_rate_mib: a.dirty_rate,
                working_set_mib: a.working_set,
            })
        }
        KindArg::Raw => {
            let image = a.image.as_ref().ok_or_else(|| Failure {
                code: 2,
                message: "--kind raw needs --image FILE".into(),
            })?;
            GuestKind::Raw(RawParams {
                image: absolute(image)?,
                mode: match a.mode {
                    RawModeArg::Real => RawMode::Real,
                    RawModeArg::LongUser => RawMode::LongUser,
                },
                load_addr: a.load_addr,
                cs: a.entry.0,
                ip: a.entry.1,
            })
        }
    };
    Ok(CreateRequest {
        name: a.name.clone(),
        memory_mib: a.memory,
        vcpus: a.vcpus,
        kind,
        disks: parse_disks(&a.disk)?,
        nics: parse_nics(&a.name, &a.nic),
        cpu: CpuPolicy {
            model: a.cpu_model.clone(),
            mask: a.cpu_mask.clone(),
        },
        start: a.start,
    })
}

fn action(cli: &Cli, c: &Client, name: &str, verb: &str, done: &str) -> Result<(), Failure> {
    let i: VmInfo = c.post_empty(&vm_path(name, &format!("/{verb}")))?;
    out(cli, &i, |i| format!("{done} {}: {}\n", i.name, i.state));
    Ok(())
}

fn console(cli: &Cli, c: &Client, name: &str, follow: bool) -> Result<(), Failure> {
    let mut offset = 0u64;
    if cli.json && !follow {
        // One JSON object with everything kept so far.
        let mut all: Option<ConsoleChunk> = None;
        loop {
            let chunk: ConsoleChunk = c.get(&vm_path(
                name,
                &format!("/console?offset={offset}&max=65536"),
            ))?;
            let done = chunk.next_offset == chunk.offset;
            offset = chunk.next_offset;
            match &mut all {
                None => all = Some(chunk),
                Some(a) => {
                    a.data.push_str(&chunk.data);
                    a.next_offset = chunk.next_offset;
                }
            }
            if done {
                break;
            }
        }
        if let Some(a) = all {
            out(cli, &a, |_| String::new());
        }
        return Ok(());
    }
    loop {
        let chunk: ConsoleChunk = match c.get(&vm_path(
            name,
            &format!("/console?offset={offset}&max=65536"),
        )) {
            Ok(ch) => ch,
            Err(ClientError::Api { status: 404, .. }) if follow && offset > 0 => {
                eprintln!("ferry: {name} is gone");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let more = chunk.next_offset > chunk.offset;
        if cli.json {
            // --follow --json: one compact object per line.
            if more {
                println!("{}", serde_json::to_string(&chunk).unwrap_or_default());
            }
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(chunk.data.as_bytes());
            let _ = o.flush();
        }
        offset = chunk.next_offset;
        if !more {
            if !follow {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn human_info(i: &VmInfo) -> String {
    let mut s = format!(
        "name:        {}\nstate:       {}\nkind:        {}\nmemory:      {} MiB\nvCPUs:       {}\n",
        i.name,
        i.state,
        i.spec.kind.name(),
        i.spec.memory_mib,
        i.spec.vcpus
    );
    match &i.spec.kind {
        GuestKind::Workload(p) => {
            s += &format!(
                "profile:     {:?}\nworking set: {}\n",
                p.profile,
                p.working_set_mib
                    .map_or("all memory".to_string(), |m| format!("{m} MiB"))
            );
        }
        GuestKind::Raw(p) => {
            s += &format!(
                "image:       {}\nmode:        {:?}\n",
                p.image.display(),
                p.mode
            );
        }
        GuestKind::Service(p) => {
            s += &format!(
                "address:     {}/{}\njournal:     {} records/s\nworking set: {} MiB at {} MiB/s\n",
                p.ip, p.prefix_len, p.journal_rate, p.working_set_mib, p.dirty_rate_mib
            );
        }
    }
    for n in &i.nics {
        s += &format!(
            "nic:         tap {} rx {} (dropped {}, queued {}) tx {} (dropped {})\n",
            n.tap.as_deref().unwrap_or("-"),
            n.rx_frames,
            n.rx_dropped,
            n.rx_queued,
            n.tx_frames,
            n.tx_dropped
        );
    }
    for d in &i.disks {
        s += &format!(
            "disk:        {} reads {} writes {} flushes {} errors {}\n",
            d.path
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
            d.reads,
            d.writes,
            d.flushes,
            d.errors
        );
    }
    if let Some(f) = &i.fault {
        s += &format!("fault:       {f}\n");
    }
    for l in &i.disk_locks {
        let holder = match (&l.holder, &l.error) {
            (_, Some(e)) => format!("lock unreadable: {e}"),
            (None, None) => "not locked".to_string(),
            (Some(h), None) => format!(
                "locked by {} on {}{}",
                h.vm,
                h.host,
                if h.stale {
                    " (STALE: its host stopped renewing the lease)"
                } else {
                    ""
                }
            ),
        };
        s += &format!("disk lock:   {} ({holder})\n", l.disk);
    }
    if let Some(d) = &i.dirty_rate {
        let measured = d.measured_mib_per_sec.map_or_else(
            || "not measured yet (the guest started or arrived just now)".to_string(),
            |m| format!("{m:.1} MiB/s measured"),
        );
        s += &format!(
            "dirty rate:  {measured}, {} MiB/s requested\n",
            d.requested_mib_per_sec
        );
    }
    if i.last_pause_us > 0 {
        s += &format!("last pause:  {} us\n", i.last_pause_us);
    }
    if i.last_resume_us > 0 {
        s += &format!("last resume: {} us\n", i.last_resume_us);
    }
    let e = &i.exits;
    s += &format!(
        "exits:       {} out, {} in, {} mmio, {} yields, {} unknown port, {} interrupted\n",
        e.io_out,
        e.io_in,
        e.mmio_read + e.mmio_write,
        e.yields,
        e.unknown_port,
        e.interrupted
    );
    if !i.heartbeats.is_empty() {
        s += &format!(
            "\n{:<5} {:<5} {:>14} {:>14} {:>6} {:>12} {:>10} {:>10}\n",
            "VCPU", "PHASE", "BEATS", "BEATS/S", "PASS", "PAGES", "DIRTY MiB/s", "YIELDS/S"
        );
        let rate = |r: Option<f64>, decimals: usize| {
            r.map_or_else(|| "-".to_string(), |r| format!("{r:.decimals$}"))
        };
        for h in &i.heartbeats {
            s += &format!(
                "{:<5} {:<5} {:>14} {:>14} {:>6} {:>12} {:>10} {:>10}\n",
                h.id,
                h.phase,
                h.beats,
                rate(h.beats_per_sec, 0),
                h.pass,
                h.pages_written,
                rate(h.dirty_mib_per_sec, 1),
                rate(h.yields_per_sec, 0)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("512m"), Ok(512));
        assert_eq!(parse_size_mib("300"), Ok(300));
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("99999999999999999999T").is_err());
        assert_eq!(parse_entry("0000:7c00"), Ok((0, 0x7c00)));
        assert!(parse_entry("7c00").is_err());
        assert_eq!(parse_u64("0x400000"), Ok(0x400000));
    }

    #[test]
    fn service_create_arguments() {
        let parse = |args: &[&str]| {
            let mut v = vec!["ferry", "vm", "create", "s1", "--kind", "service"];
            v.extend_from_slice(args);
            let cli = Cli::try_parse_from(v).unwrap();
            let Command::Vm(VmCommand::Create(a)) = cli.command else {
                panic!()
            };
            create_request(&a)
        };
        let r = parse(&[
            "--ip",
            "198.18.2.10/24",
            "--journal-rate",
            "200",
            "--working-set",
            "64M",
            "--dirty-rate",
            "16",
        ])
        .unwrap();
        let GuestKind::Service(p) = r.kind else {
            panic!("not a service kind")
        };
        assert_eq!(p.ip, std::net::Ipv4Addr::new(198, 18, 2, 10));
        assert_eq!(
            (
                p.prefix_len,
                p.journal_rate,
                p.working_set_mib,
                p.dirty_rate_mib
            ),
            (24, 200, 64, 16)
        );
        for (args, needle) in [
            (&[][..], "needs --ip"),
            (&["--ip", "198.18.2.10"][..], "prefix"),
            (&["--ip", "198.18.2/24"][..], "not an IPv4"),
            (&["--ip", "198.18.2.10/40"][..], "prefix length"),
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.code, 2);
            assert!(
                e.message.contains(needle),
                "{:?} lacks {needle:?}",
                e.message
            );
        }
        let cli =
            Cli::try_parse_from(["ferry", "vm", "create", "w", "--ip", "198.18.2.10/24"]).unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!()
        };
        assert!(create_request(&a)
            .unwrap_err()
            .message
            .contains("--kind service"));
    }

    #[test]
    fn raw_without_image_is_a_usage_error() {
        let cli = Cli::try_parse_from(["ferry", "vm", "create", "x", "--kind", "raw"]).unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!()
        };
        let e = create_request(&a).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("--image"));
    }
}
