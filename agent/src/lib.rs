//! Ferry: a host agent that runs KVM guests and live-migrates them between hosts.
//!
//! The binary (`src/main.rs`) only parses the command line; everything lives here:
//!
//! - [`vm`]: the KVM guest runtime (memory + dirty log, vCPU threads, devices, state).
//! - [`control`]: the agent daemon, its configuration and its local HTTP/JSON API.
//! - [`migrate`]: live migration (engine, codec, wire protocol, convergence).
//! - [`transport`]: the data streams (TCP sockets, io_uring sends and receives).
//! - [`cli`]: the `ferry` command line, a client of that API.
//! - [`vmm`]: `ferry vmm`, one guest in a jailed process of its own, and the agent's client of it.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod announce;
pub mod checks;
pub mod cli;
pub mod control;
pub mod faults;
pub mod metrics;
pub mod migrate;
pub mod netpin;
pub mod ratelimit;
pub mod transport;
pub mod vm;
pub mod vmm;
