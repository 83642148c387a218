//! Keeping each trunk registered with its core (DESIGN.md item 7): the pure state
//! machine in [`machine`] and the task that drives it in [`driver`].

pub mod driver;
pub mod machine;

pub use driver::{Outgoing, RegistrationStatus, TrunkRegistration};
pub use machine::State;
