//! The command line's clap definitions: [`Cli`] and its subcommands (xtask generates the man
//! pages and shell completions from them).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::parse::{parse_codec, parse_entry, parse_size_mib, parse_u64};

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
    Vmm(VmmCmd),
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
    pub codec: ferry::migrate::tune::CodecChoice,
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

/// `ferry vmm` (internal: the agent starts it).
#[derive(Debug, Clone, clap::Args)]
pub struct VmmCmd {
    /// The guest's name (also the socket's: DIR/vmm/NAME.sock)
    #[arg(long)]
    pub name: String,
    /// The agent's state directory
    #[arg(long, value_name = "DIR")]
    pub state_dir: std::path::PathBuf,
    /// Start a new guest from this launch file (JSON: spec, devices, host)
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "incoming",
        required_unless_present = "incoming"
    )]
    pub create: Option<std::path::PathBuf>,
    /// Wait for an incoming migration: an empty guest of this launch file's layout (JSON: spec,
    /// regions, devices, host)
    #[arg(long, value_name = "FILE")]
    pub incoming: Option<std::path::PathBuf>,
    /// The user the VMM becomes once set up (not 0)
    #[arg(long, default_value_t = ferry::vmm::DEFAULT_UID)]
    pub uid: u32,
    /// The group the VMM becomes once set up (not 0)
    #[arg(long, default_value_t = ferry::vmm::DEFAULT_GID)]
    pub gid: u32,
    /// Accept test-only requests (a forbidden system call); never used by the agent
    #[arg(long, hide = true)]
    pub test_requests: bool,
    /// What the seccomp filter does with a forbidden call (log: find what a new kernel or libc
    /// needs; never in production)
    #[arg(long, value_parser = ["kill", "log"], default_value = "kill", hide = true)]
    pub seccomp: String,
}

impl VmmCmd {
    /// What the library's `ferry vmm` takes.
    pub fn to_args(&self) -> ferry::vmm::VmmArgs {
        ferry::vmm::VmmArgs {
            name: self.name.clone(),
            state_dir: self.state_dir.clone(),
            create: self.create.clone(),
            incoming: self.incoming.clone(),
            uid: self.uid,
            gid: self.gid,
            test_requests: self.test_requests,
            seccomp: if self.seccomp == "log" {
                ferry::vmm::jail::SeccompMode::Log
            } else {
                ferry::vmm::jail::SeccompMode::Kill
            },
        }
    }
}
