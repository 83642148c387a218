//! The pure SIP core: a zero-copy message view ([`view`]) and the proxy's message
//! model over it ([`wire`]), message helpers over `rsip` for the messages the sidecar
//! builds itself, stream framing and the RFC 3261 §17 transaction state machines.
//!
//! Nothing in here touches a socket, a runtime or a clock. Every input that depends on
//! time takes `now` as an argument, and every output is pulled with a `poll_*` call, so the
//! whole module is tested in virtual time with plain `#[test]`s.

pub mod auth;
pub mod dialog;
pub mod digest;
pub mod framing;
pub mod header;
pub mod message;
pub mod transaction;
pub mod via;
pub mod view;
pub mod wire;

pub use message::{Message, MessageError};

/// The URI parameter of this sidecar's Record-Route entries and registered Contacts that
/// carries the trunk's index, so in-dialog requests and requests to a registered
/// Contact find their trunk again.
pub const TRUNK_PARAM: &str = "bsct";
pub use via::Via;
