//! The sans-IO data plane of a mesh node. [`Dataplane`] is the one object that decides everything about a
//! packet; inside it, [`Node`] holds the WireGuard peers (boringtun's noise, not its device), the allowed-IPs
//! table, the inbound source check, timers and roaming, and [`router::Router`] the subnet-router path (SNAT,
//! MSS clamping, refusals). The shell feeds packets from the TUN device and datagrams from the network with
//! the time, and sends what [`Dataplane::poll_transmit`] returns; nothing here touches a socket.
//!
//! Time: every timer takes `now` as a parameter; nothing here reads a clock. boringtun's session timers read
//! their own (monotonic, or `mock_instant` with the `mock-clock` feature, which the simulation uses).
#![forbid(unsafe_code)]

mod dataplane;
pub mod dns;
mod drop_reason;
pub mod ha;
pub mod netmap;
mod node;
pub mod router;
mod routes;

#[doc(hidden)]
pub mod fuzzing;

pub use dataplane::{
    Applied, ConfigError, DROP_REPORT_INTERVAL, Dataplane, DataplaneConfig, Event, PING_TIMEOUT, SnatSettings,
    Transmit, check_snat,
};
pub use drop_reason::DropReason;
pub use node::{Handshake, Key, Node, NodeCounters, PeerError, PeerId, PeerSpec, PeerStatus, Received};
pub use routes::PrefixTable;

/// xorshift64: a cheap, seedable source for choices that must differ between runs but need not be secret
/// (session indices, SNAT port order, ping identifiers).
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
