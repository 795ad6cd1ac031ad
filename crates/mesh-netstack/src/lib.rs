//! Userspace mode: meshd as a sidecar with no TUN device and no privileges. A smoltcp stack takes the data
//! plane's packets for this node and terminates them inside the process; apps reach the mesh through local
//! forwards (`--forward`), a SOCKS5/HTTP proxy, and a DNS stub that answers mesh names; peers reach the
//! app's ports the node exposes (`--expose`), and nothing else.
#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod listen;
pub mod socks5;
pub mod spec;
pub mod stack;

pub use listen::{AppEvent, Credentials, Dial, Protocols, UdpOut};
pub use spec::{Expose, Forward, Proto, Target};
pub use stack::{Counters, Greeting, Limits, Refusal, Stack, UdpError, UdpId, UdpReply};
