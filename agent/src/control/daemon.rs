//! `ferry agent`: the daemon. Opens /dev/kvm, serves the local API on its unix socket, samples
//! guest heartbeats, and on SIGTERM/SIGINT stops cleanly (its guests stop with it) and removes
//! the socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::agent::{Agent, SAMPLE_INTERVAL};
use super::api;
use super::config::Config;
use crate::vm::{Hypervisor, VmError};

/// Errors starting or running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Datastore(#[from] crate::checks::datastore::DatastoreError),
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    #[error("another agent is already serving {0}; stop it first (or use another [agent] socket)")]
    AlreadyRunning(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for peer agents on {addr} ([management] address and port): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("API server failed: {0}")]
    Serve(#[source] std::io::Error),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Bind the API socket: refuse if a live agent answers on it, replace a stale one, mode 0660.
fn bind(path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("cannot create socket directory", dir))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err("cannot remove stale socket", path))?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(io_err("cannot listen on", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("cannot set permissions of", path))?;
    Ok(l)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}

/// Load the eBPF programs where the configuration asks for them; say once why not otherwise.
fn start_netpin(config: &Config) -> Result<Arc<crate::netpin::NetPin>, crate::netpin::NetpinOff> {
    use crate::netpin::NetpinOff;
    let Some(m) = &config.migration else {
        return Err(NetpinOff::NoMigration);
    };
    if !m.ebpf {
        return Err(NetpinOff::Disabled);
    }
    let Some(iface) = &m.interface else {
        return Err(NetpinOff::NoInterface);
    };
    let cfg = crate::netpin::NetpinConfig {
        migration_interface: iface.clone(),
        migration_addr: match m.address {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        },
        pin: m.pin,
        dedicated: m.dedicated,
        link_speed_bps: m
            .link_speed
            .as_deref()
            .and_then(|s| crate::netpin::parse_speed(s).ok()),
    };
    crate::netpin::NetPin::start(cfg).map_err(NetpinOff::Unavailable)
}

/// Run the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    super::memory::tune();
    // Migrations tell whoever observes them when they end; the metrics count them.
    crate::migrate::observe_endings(super::metrics::ended);
    let hv = Hypervisor::open()?;
    hv.huge_pages.store(
        config.limits.huge_pages,
        std::sync::atomic::Ordering::Relaxed,
    );
    std::fs::create_dir_all(&config.agent.state_dir).map_err(io_err(
        "cannot create state directory",
        &config.agent.state_dir,
    ))?;
    let mask = config
        .cpu
        .mask
        .iter()
        .filter_map(|f| crate::vm::cpuid::parse_feature(f).ok())
        .collect();
    hv.set_host_mask(mask);
    let datastores = crate::checks::datastore::Datastores::open(&config.datastores)?;
    let key = match &config.cluster.key_file {
        Some(p) => Some(Arc::new(crate::auth::ClusterKey::load(p)?)),
        None => {
            if config.management.is_some() {
                tracing::warn!("no [cluster] key_file: peer agents are not authenticated; anyone who can reach the management address can send or take guests");
            }
            None
        }
    };
    let socket = config.agent.socket.clone();
    let netpin = start_netpin(&config);
    if let Err(why) = &netpin {
        // Said once, here; `ferry stats` and the API repeat the reason.
        let asked = (config.migration.as_ref()).is_some_and(|m| m.ebpf && m.interface.is_some());
        if asked {
            tracing::warn!(reason = %why, "eBPF pinning and link utilization are off");
        } else {
            tracing::info!(reason = %why, "eBPF pinning and link utilization are off");
        }
    }
    let agent = Agent::new(config, hv.clone(), netpin, datastores, key);

    if let Some(m) = &agent.config.management {
        let addr = std::net::SocketAddr::new(m.address, m.port);
        let l = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| DaemonError::Listen { addr, source })?;
        let host: Arc<dyn crate::migrate::dest::Host> = agent.clone();
        tokio::spawn(super::peer::serve(l, host));
        tracing::info!(%addr, "listening for peer agents");
    }

    if let Some(addr) = agent.config.metrics.address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Listen { addr, source })?;
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics))
            .with_state(agent.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }

    // The local API last: once it answers, the agent is fully up.
    let listener = bind(&socket)?;
    tracing::info!(
        name = %agent.config.agent.name,
        socket = %socket.display(),
        tsc_khz = hv.tsc_khz,
        version = env!("CARGO_PKG_VERSION"),
        "agent ready"
    );

    // Disk-lock heartbeat: renewed every third of the lease, so a live host's locks are never
    // reported stale.
    let lease_renewer = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(agent.disk_lease() / 3);
            loop {
                t.tick().await;
                let a = agent.clone();
                let _ = tokio::task::spawn_blocking(move || a.renew_disk_leases()).await;
            }
        })
    };

    let sampler = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(SAMPLE_INTERVAL);
            loop {
                t.tick().await;
                let a = agent.clone();
                let _ = tokio::task::spawn_blocking(move || a.sample_all()).await;
            }
        })
    };

    // Under systemd (Type=notify): ready now, and a watchdog heartbeat from the runtime, so a
    // wedged agent gets restarted.
    super::sdnotify::notify("READY=1");
    let watchdog = super::sdnotify::watchdog_interval().map(|every| {
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                super::sdnotify::notify("WATCHDOG=1");
            }
        })
    });

    let app = api::router(agent.clone());
    let served = super::api_server::serve(listener, app, shutdown_signal()).await;
    sampler.abort();
    lease_renewer.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    super::sdnotify::notify("STOPPING=1");
    let a = agent.clone();
    let _ = tokio::task::spawn_blocking(move || a.shutdown()).await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("agent stopped");
    served.map_err(DaemonError::Serve)
}

/// `GET /metrics`: Prometheus text (see [`super::metrics`]).
async fn metrics(
    axum::extract::State(agent): axum::extract::State<Arc<Agent>>,
) -> impl axum::response::IntoResponse {
    let a = agent.clone();
    let live = tokio::task::spawn_blocking(move || {
        let mut live = super::metrics::Live::default();
        for v in a.list() {
            let state = serde_json::to_value(v.state)
                .ok()
                .and_then(|s| s.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", v.state).to_lowercase());
            *live.guests.entry(state).or_default() += 1;
        }
        for i in a.stats().interfaces {
            for (d, dir) in [("tx", &i.tx), ("rx", &i.rx)] {
                let bps = dir.migration.bits_per_s + dir.other.bits_per_s;
                let ratio = i.speed_bps.filter(|s| *s > 0).map(|s| bps / s as f64);
                live.links.push((i.name.clone(), d, bps, ratio));
            }
        }
        live
    })
    .await
    .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::render(&live),
    )
}
