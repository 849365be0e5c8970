//! Ferry: a host agent that runs KVM guests and live-migrates them between hosts.
//!
//! The `ferry-agent` package (crate name `ferry`). The `ferry` command is the `ferry-cli`
//! package (`agent/cli/`), a client of this library; everything else lives here:
//!
//! - [`vm`]: the KVM guest runtime (memory + dirty log, vCPU threads, devices, state).
//! - [`control`]: the agent daemon, its configuration and its local HTTP/JSON API.
//! - [`migrate`]: live migration (engine, codec, wire protocol, convergence).
//! - [`transport`]: the data streams (TCP sockets, io_uring sends and receives).
//! - [`checks`]: what a migration needs from a destination (host facts, the evaluation).
//! - [`vmm`]: `ferry vmm`, one guest in a jailed process of its own, and the agent's client of it.
//! - [`auth`] and [`util`]: the cluster key and its proofs; error chains and random numbers.
//!
//! Dependencies run one way: the CLI (`ferry-cli` package) → `control` → `migrate` → (`checks`, `transport`) →
//! (`vm`, `netpin`) → (`auth`, `util`).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod announce;
pub mod auth;
pub mod checks;
pub mod control;
pub mod faults;
pub mod migrate;
pub mod netpin;
pub mod ratelimit;
pub mod transport;
pub mod util;
pub mod vm;
pub mod vmm;
