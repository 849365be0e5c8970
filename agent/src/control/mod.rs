//! The control plane: the agent daemon, its configuration, its local API and the client the CLI
//! uses. It never touches guest memory on a hot path; it drives the [`crate::vm`] runtime.

pub mod agent;
pub mod api;
pub mod api_server;
pub mod client;
pub mod config;
pub mod daemon;
pub mod memory;
pub mod metrics;
pub mod peer;
pub mod sdnotify;
