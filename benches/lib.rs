//! Ferry's benchmarks.
//!
//! - End to end, in the lab: `cargo xtask bench guest` (workload guest: requested vs measured
//!   dirty rate, heartbeat rate, agent CPU, pause latency; JSON lines in `target/bench/`).
//! - Micro-benchmarks of the data path (codec, zero-page scan, frames) come with the migration
//!   engine.
