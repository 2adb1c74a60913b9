//! The service manager's readiness protocol (sd_notify(3)): when systemd starts Gannet as a
//! `Type=notify` service it sets `NOTIFY_SOCKET`, and Gannet says `READY=1` once every shard
//! serves, `RELOADING=1` then `READY=1` around a SIGHUP reload, and `STOPPING=1` when it begins
//! to shut down. Without `NOTIFY_SOCKET` (any other way of running it) these do nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot tell the service manager {states:?}: {e}");
    }
}

/// Every shard serves.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A SIGHUP reload begins (systemd waits for the next `READY=1`).
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// The reload is done, whatever it kept or replaced.
pub fn reloaded() {
    send(&[NotifyState::Ready, NotifyState::Status("serving; reloaded")]);
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
