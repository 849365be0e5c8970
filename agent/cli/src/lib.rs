//! The `ferry` command line (the `ferry-cli` package: this library and the `ferry` binary).
//! `ferry agent` runs the daemon; every other command is a client of a running agent's API.
//!
//! Which agent: `--socket PATH` (or `FERRY_SOCKET`), else `--host NAME` (or `FERRY_HOST`) for a
//! host of the two-host lab (`cargo xtask lab up`), whose socket is
//! `$FERRY_LAB_ROOT/NAME/agent.sock` (default root `/run/ferry/lab`), else
//! `/run/ferry/agent.sock`.
//!
//! Exit codes: 0 success; 1 the agent refused or the operation failed (the message says why);
//! 2 bad command line or request (the input itself is wrong: the agent answered 400);
//! 3 the agent cannot be reached; 4 `ferry ping` lost some probes.
//!
//! The library holds everything the binary does, so that xtask can generate the man pages and
//! completions from the same definitions: [`args`] (the clap types), [`parse`] (arguments into
//! requests), the commands in groups ([`agent`]: the daemon; [`host`]: the host and its peers;
//! [`vm`]: guests; [`migrate`]: migrations), [`human`] (tables and summaries for people) and
//! [`logging`] (the daemon's log output). The agent itself is the `ferry` library
//! (`ferry-agent` package); this crate is a client of its API.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use ferry::control::client::ClientError;
use ferry::control::config::DEFAULT_SOCKET;

pub mod agent;
pub mod args;
pub mod host;
pub mod human;
pub mod logging;
pub mod migrate;
pub mod parse;
pub mod vm;

pub use args::*;
pub use parse::{derived_mac, parse_size_mib};

/// Default root of the lab made by `cargo xtask lab up`.
pub const DEFAULT_LAB_ROOT: &str = "/run/ferry/lab";

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

/// A refusal or failure (exit code 1).
pub(crate) fn fail(message: impl Into<String>) -> Failure {
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

/// The agent's socket: `--socket`, else the lab host's of `--host`, else the system agent's.
pub(crate) fn socket_path(cli: &Cli) -> PathBuf {
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
        Command::Agent(a) => agent::run_agent(a),
        Command::Vmm(a) => {
            // Plain text to stderr: the monitor and the agent keep it with the guest's records.
            logging::init_logging(args::LogFormat::Text);
            ferry::vmm::run(&a.to_args())
        }
        .map_err(|e| fail(e.to_string())),
        Command::Host => host::run_host(&cli),
        Command::Vm(v) => vm::run_vm(&cli, v),
        Command::Migrate(m) => migrate::run_migrate(&cli, m),
        Command::Ping(p) => host::run_ping(&cli, p),
        Command::Stats { watch } => host::run_stats(&cli, *watch),
        Command::Check { vm, to } => host::run_check(&cli, vm, to),
        Command::Disk(DiskCommand::Unlock { disk }) => host::run_disk_unlock(&cli, disk),
        Command::Cpu(CpuCommand::Baseline { peers }) => host::run_cpu_baseline(&cli, peers),
        Command::Migrations { id } => migrate::run_migrations(&cli, id.as_deref()),
    }
}

/// Print `v`: as JSON with `--json`, else as `human` writes it.
pub(crate) fn out<T: Serialize>(cli: &Cli, v: &T, human: impl FnOnce(&T) -> String) {
    let text = if cli.json {
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
    } else {
        human(v)
    };
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

/// `s` escaped for a URL path or query.
pub(crate) fn enc(s: &str) -> String {
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

/// The API path of VM `name`, then `tail`.
pub(crate) fn vm_path(name: &str, tail: &str) -> String {
    // Names are validated by the agent; escape anything that would break the path anyway.
    format!("/v1/vms/{}{tail}", enc(name))
}
