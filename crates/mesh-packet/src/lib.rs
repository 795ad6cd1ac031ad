//! The packet layer of meshd: zero-copy header views ([`wire`]), Internet checksums and their incremental
//! update ([`checksum`]), a packet builder ([`build`]) and the userspace SNAT engine ([`snat`]).
//!
//! Nothing here performs I/O or reads a clock: time is passed in, so everything can be tested and
//! benchmarked without a kernel.
#![forbid(unsafe_code)]

pub mod build;
pub mod checksum;
pub mod filter;
pub mod mss;
pub mod snat;
pub mod wire;

#[doc(hidden)]
pub mod fuzzing;
