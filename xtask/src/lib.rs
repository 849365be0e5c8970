//! Ferry's development tasks, as a library so that integration tests can use them too.
//!
//! - [`lab`]: the two-host lab (network namespaces, datastores, agents).
//! - [`dev`]: deps, test, demo, benchmarks.
//! - [`dist`]: the Debian package; [`packaging`]: its test under a real systemd.
//! - [`guest`]: the service guest's reproducible build (`guest/ferry-guest.bin`).

pub mod dev;
pub mod dist;
pub mod guest;
pub mod lab;
pub mod matrix;
pub mod packaging;
