//! The control plane: the agent daemon, its configuration, its local API and the client the CLI
//! uses. It never touches guest memory on a hot path; it drives the [`crate::vm`] runtime.

pub mod agent;
pub mod api;
pub mod api_server;
pub mod client;
pub mod config;
pub mod daemon;
pub mod memory;
pub mod peer;
pub mod sdnotify;

/// An error and its causes on one line, each cause once (for the CLI and API messages).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}
