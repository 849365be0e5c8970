//! The source side: pre-copy rounds over the dirty log, convergence, switchover and handoff.
//!
//! One orchestrating thread (this module's [`run`]) walks the dirty bitmap and hands page
//! addresses to one worker per data stream; each worker copies its pages out of guest memory,
//! encodes them ([`super::codec`]) and writes `Pages` frames. A round ends when every worker has
//! written its `RoundEnd` and reported its totals. Then [`super::converge::decide`] says what
//! next.
//!
//! [`run`] goes through the phases in order, one function each:
//!
//! | phase | where |
//! |---|---|
//! | `Setup`/`Ready`, data streams and their workers | `engine.rs` (`prepare`) |
//! | pre-copy rounds until the policy says stop | `engine.rs` (`precopy`) |
//! | switchover: pause, last pages, state, `Complete` → `Prepared` | `switchover.rs` |
//! | commit: `Commit` → `Resumed`, forwarding, `Observed` | `commit.rs` |
//! | after-commit resolution (contact lost past the commit point) | [`super::resolve`] |
//!
//! The per-stream workers live in `worker.rs`, their codec tuner in `tuner.rs`. The guest is
//! only seen through [`SourceGuest`].
//!
//! Failure rule: until the `Commit` frame is written, any error sends `Abort` to the destination,
//! turns dirty logging off, lifts any throttle and resumes the guest if this engine paused it.

mod commit;
mod engine;
mod sink;
mod switchover;
mod tuner;
mod worker;

use std::io::BufReader;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::guest::SourceGuest;
use super::protocol::{self, Command, FrameReader, FrameWriter};
use super::{GuestOn, MigrateError, MigrateOptions, MigrationHandle, Summary};
use crate::vm::VmStatus;

pub use super::resolve::RESOLVE_WINDOW;
pub(crate) use sink::DataSink;

/// How long the destination may take to answer a control message.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything one outgoing migration needs.
pub struct SourceJob {
    pub handle: Arc<MigrationHandle>,
    /// The guest that moves (a KVM [`crate::vm::Vm`] in the agent).
    pub vm: Arc<dyn SourceGuest>,
    /// The peer agent's control address.
    pub peer: SocketAddr,
    /// This host's migration address (data connections leave from it).
    pub local_migration: IpAddr,
    /// This agent's name and cluster key.
    pub identity: super::session::Identity,
    pub options: MigrateOptions,
    /// The eBPF link counters, for utilization in progress and summary.
    pub link: Option<Arc<crate::netpin::NetPin>>,
    /// The cluster's ownership records (None: the commit point is the `Commit` frame alone).
    pub ownership: Option<super::ownership::Ownership>,
}

/// How a failed migration left things.
#[derive(Debug)]
pub struct Failure {
    pub error: MigrateError,
    /// True when the failure came after the commit was sent.
    pub after_commit: bool,
    /// Where the guest runs now: the source (resumed here), the destination (contact was lost
    /// after the commit but the guest runs there: the caller destroys this copy), or unresolved
    /// (this copy stays paused).
    pub guest_on: GuestOn,
    /// How far the migration got (after the commit: everything up to `Prepared`).
    pub summary: Option<Summary>,
    /// How an after-commit failure was resolved.
    pub note: Option<String>,
}

impl Failure {
    /// A failure before the commit: the guest runs here.
    fn before_commit(error: MigrateError) -> Box<Failure> {
        Box::new(Failure {
            error,
            after_commit: false,
            guest_on: GuestOn::Source,
            summary: None,
            note: None,
        })
    }
}

/// The authenticated control connection to the destination agent.
struct Control {
    w: FrameWriter<TcpStream>,
    r: FrameReader<BufReader<TcpStream>>,
    conn: TcpStream,
    /// The destination agent's name, as it proved it.
    peer_agent: String,
}

impl Control {
    /// Bound the wait for the next frame; `what` names it in a timeout's error.
    fn expect_within(&mut self, d: Duration, what: &'static str) {
        let _ = self.conn.set_read_timeout(Some(d));
        self.r.set_timeout(Some(d), what);
    }

    /// Tell the destination why the migration stops (best effort).
    fn abort(&mut self, e: &MigrateError) {
        let _ = self.w.send_msg(Command::Abort, &e.to_abort());
    }
}

/// Run an outgoing migration to completion. On success the destination runs the guest and the
/// caller destroys the source copy; on failure before the commit the guest runs here again.
pub fn run(job: &SourceJob) -> Result<Summary, Box<Failure>> {
    let t0 = Instant::now();
    let session = super::session::connect(job.peer, &job.identity, CONTROL_TIMEOUT)
        .map_err(Failure::before_commit)?;
    tracing::debug!(peer = %session.peer_agent, version = session.version, "session open");
    let super::session::Session {
        w,
        r,
        conn,
        peer_agent,
        ..
    } = session;
    let _ = crate::transport::tcp::keepalive(&conn);
    let mut ctl = Control {
        w,
        r,
        conn,
        peer_agent,
    };
    let mut paused_here = false;
    match engine::prepare(job, &mut ctl, &mut paused_here, t0) {
        Ok((summary, mark)) => commit::commit(job, &mut ctl, summary, mark, t0),
        Err(e) => Err(abort_before_commit(job, &mut ctl, paused_here, e)),
    }
}

/// A failure before the commit point: find the destination's reason if it hung up on purpose,
/// tell it to abort, and bring the guest back here.
fn abort_before_commit(
    job: &SourceJob,
    ctl: &mut Control,
    paused_here: bool,
    e: MigrateError,
) -> Box<Failure> {
    // A data stream that broke may be the destination hanging up on purpose: its reason (say,
    // a checksum that did not match) is waiting on the control connection.
    let e = match e {
        MigrateError::Stream { .. } | MigrateError::Protocol(_) => {
            ctl.expect_within(Duration::from_secs(1), "the destination's reason");
            match ctl.r.read_frame().and_then(|f| f.expect(Command::Ready)) {
                Err(a @ protocol::ProtocolError::Aborted { .. }) => {
                    MigrateError::from_abort(a, None)
                }
                // No reason given: the destination went away (stopped, crashed, or the network
                // between us failed).
                _ => MigrateError::Lost {
                    peer: ctl.peer_agent.clone(),
                    cause: crate::util::error_chain(&e),
                },
            }
        }
        e => e,
    };
    ctl.abort(&e);
    let _ = ctl.conn.shutdown(std::net::Shutdown::Both);
    let vm = job.vm.as_ref();
    bring_back(vm, paused_here && vm.status() == VmStatus::Paused);
    tracing::warn!(vm = %vm.spec().name, id = %job.handle.id, error = %crate::util::error_chain(&e), "migration failed; the guest runs on the source");
    Failure::before_commit(e)
}

/// Undo what the engine did to the guest: throttle off, dirty logging off, and (`resume`) the
/// vCPUs running again.
fn bring_back(vm: &dyn SourceGuest, resume: bool) {
    vm.set_throttle(0);
    let _ = vm.set_dirty_logging(false);
    if resume {
        if let Err(re) = vm.resume() {
            tracing::error!(vm = %vm.spec().name, error = %re, "could not resume the guest after a failed migration");
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
