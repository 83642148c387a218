//! byoc-sidecar: a SIP proxy beside a telephony Edge that owns the trunk's credentials.
//!
//! The pure protocol core lives in [`sip`]; [`transport`] and [`proxy`] drive it over
//! sockets; [`config`] is the validated configuration.

pub mod sip;
