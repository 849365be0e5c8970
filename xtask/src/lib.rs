//! Ferry's development tasks, as a library so that integration tests can use them too.
//!
//! - [`lab`]: the two-host lab (network namespaces, datastores, agents).
//! - [`dev`]: deps, test, demo, benchmarks.
//! - [`dist`]: the Debian package; [`packaging`]: its test under a real systemd.

pub mod dev;
pub mod dist;
pub mod lab;
pub mod matrix;
pub mod packaging;
