//! The sans-IO mesh node: WireGuard peers (boringtun's noise, not its device), the allowed-IPs table,
//! the inbound source check, timers and roaming. The shell feeds it packets from the TUN device and datagrams
//! from the network and sends what [`Node::poll_transmit`] returns; the node never touches a socket.
//!
//! Time: the node's own timers take `now` as a parameter. boringtun's session timers read their own clock
//! (monotonic, or `mock_instant` with the `mock-clock` feature, which the simulation uses).
#![forbid(unsafe_code)]

pub mod netmap;
mod node;
pub mod router;
mod routes;

#[doc(hidden)]
pub mod fuzzing;

pub use node::{Drop, Key, Node, NodeCounters, PeerError, PeerId, PeerSpec, PeerStatus, Received, Transmit};
pub use routes::PrefixTable;
