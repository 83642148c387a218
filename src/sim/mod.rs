//! Simulators used by the tests, the demo and load runs: real servers on loopback that
//! behave like the systems the sidecar talks to, with faults to inject.

pub mod core;
pub mod edge;
pub mod idp;
pub mod serve;
