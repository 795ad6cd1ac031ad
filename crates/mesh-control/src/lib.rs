//! The coordination server's core: what it stores and decides, without the HTTP around it. Time is a
//! parameter (seconds since the Unix epoch), so expiry and ephemeral clean-up are tested without waiting.
#![forbid(unsafe_code)]

mod console;
mod control;
pub mod dns;
pub mod fuzzing;
pub mod http;
mod limits;
pub mod metrics;
pub mod policy;
pub mod serve;

pub use control::{
    AdvertisedRoute, AuthKey, AuthKeyOptions, Control, ControlError, NodeRecord, PolicyChange, Snapshot, StoredPolicy,
    User,
};
