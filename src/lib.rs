//! byoc-sidecar: a SIP proxy beside a telephony Edge that owns the trunk's credentials.
//!
//! The pure protocol core lives in [`sip`]; [`transport`] and [`proxy`] drive it over
//! sockets; [`config`] is the validated configuration; [`stats`] counts what happens.

pub mod admin;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod dns;
pub mod fatal;
pub mod online;
pub mod proxy;
pub mod registration;
pub mod replay;
pub mod sim;
pub mod sip;
pub mod stats;
pub mod transport;
