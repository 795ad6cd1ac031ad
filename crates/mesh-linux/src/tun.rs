//! The TUN device.

use std::io;

pub use tun_rs::AsyncDevice;

/// Creates (or opens) TUN device `name` with `mtu`, up, without addresses: those go on over netlink.
pub fn create(name: &str, mtu: u16) -> io::Result<AsyncDevice> {
    tun_rs::DeviceBuilder::new().name(name).mtu(mtu).enable(true).build_async().map_err(|e| {
        io::Error::new(e.kind(), format!("creating TUN device {name} (needs /dev/net/tun and CAP_NET_ADMIN): {e}"))
    })
}
