//! `ferry migrate` (start one and follow it, or cancel one) and `ferry migrations`.

use std::time::Duration;

use ferry::control::agent::MigrateRequest;
use ferry::control::client::Client;
use ferry::migrate::{MigrateOptions, MigrationRecord, Phase};

use crate::args::{Cli, MigrateArgs};
use crate::human::{human_migrations, human_record};
use crate::{enc, fail, out, socket_path, Failure};

/// `ferry migrate VM --to PEER`: start it and show its progress until it ends (or return at
/// once with `--detach`); `--cancel ID` instead asks a running one to stop.
pub fn run_migrate(cli: &Cli, m: &MigrateArgs) -> Result<(), Failure> {
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
        options.send_mode =
            mode.parse()
                .map_err(|e: ferry::transport::uring::UnknownSendMode| Failure {
                    code: 2,
                    message: e.to_string(),
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

/// `ferry migrations [ID]`: the table of migrations, or one in full.
pub fn run_migrations(cli: &Cli, id: Option<&str>) -> Result<(), Failure> {
    let c = Client::new(socket_path(cli));
    match id {
        Some(id) => {
            let r: MigrationRecord = c.get(&format!("/v1/migrations/{}", enc(id)))?;
            out(cli, &r, human_record);
        }
        None => {
            let l: Vec<MigrationRecord> = c.get("/v1/migrations")?;
            out(cli, &l, |l| human_migrations(l));
        }
    }
    Ok(())
}
