//! `ferry vm ...`: create, list, inspect, start, pause, resume, stop, destroy, console, save,
//! restore, digest, verify.

use std::io::Write;
use std::time::Duration;

use ferry::control::agent::{ConsoleChunk, SaveOutcome, VerifyOutcome, VmInfo, VmSummary};
use ferry::control::api::{RestoreRequest, SaveRequest};
use ferry::control::client::{Client, ClientError};

use crate::args::{Cli, VmCommand};
use crate::human::human_info;
use crate::parse::{absolute, create_request};
use crate::{fail, out, socket_path, vm_path, Failure};

/// `ferry vm SUBCOMMAND`.
pub fn run_vm(cli: &Cli, cmd: &VmCommand) -> Result<(), Failure> {
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

/// A VM action that answers with the VM (start, pause, resume, stop).
fn action(cli: &Cli, c: &Client, name: &str, verb: &str, done: &str) -> Result<(), Failure> {
    let i: VmInfo = c.post_empty(&vm_path(name, &format!("/{verb}")))?;
    out(cli, &i, |i| format!("{done} {}: {}\n", i.name, i.state));
    Ok(())
}

/// `ferry vm console NAME [--follow]`.
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
