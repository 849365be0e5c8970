//! Ferry's development tasks, as a library so that integration tests can use them too.
//!
//! - [`lab`]: the two-host lab (network namespaces, datastores, agents).

pub mod lab;
