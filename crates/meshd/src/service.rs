//! systemd's service notification protocol, so a `Type=notify` unit is started only once meshd really is
//! (the TUN device, rules and routes in place; the server listening) and knows when a stop has begun.
//! Outside systemd (no `NOTIFY_SOCKET`) each call does nothing.

use sd_notify::NotifyState;

/// Ready, with a line `systemctl status` shows.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A stop has begun: systemd waits for the exit instead of counting the cleanup as a hang.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(states: &[NotifyState]) {
    // The environment is left set: a `Restart=` of this process is a new process, and nothing meshd starts
    // would talk to systemd on its behalf.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "telling systemd the service state");
    }
}
