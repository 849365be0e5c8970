//! Ferry's development tasks, as a library so that integration tests can use them too.
//!
//! - [`lab`]: the two-host lab (network namespaces, datastores, agents).
//! - [`dev`]: deps, test, demo, benchmarks.
//! - [`dist`]: the Debian package; [`packaging`]: its test under a real systemd.
//! - [`client`]: a client of a service guest in the lab's client namespace (ping, counter stream, echo, journal status, FDB).
//! - [`guest`]: the service guest's reproducible build (`guest/ferry-guest.bin`).

pub mod client;
pub mod continuity;
pub mod dev;
pub mod dist;
pub mod guest;
pub mod lab;
pub mod matrix;
pub mod packaging;
