//! `ferry agent`: the daemon. Loads and checks the configuration, sets up logging, and runs the
//! agent ([`ferry::control::daemon::run`]) on a small tokio runtime until it stops.

use std::path::PathBuf;

use ferry::control::config::{Config, DEFAULT_CONFIG};

use crate::args::AgentArgs;
use crate::logging::init_logging;
use crate::{fail, Failure};

/// `ferry agent [--config FILE] [--log-format text|json] [--check-config]`.
pub fn run_agent(a: &AgentArgs) -> Result<(), Failure> {
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
    rt.block_on(ferry::control::daemon::run(config))
        .map_err(|e| fail(ferry::util::error_chain(&e)))
}
