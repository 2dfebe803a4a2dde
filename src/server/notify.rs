//! systemd service notifications (`Type=notify`): READY, STOPPING, STATUS and the
//! watchdog.
//!
//! All of these are no-ops when `NOTIFY_SOCKET` is unset (not run by systemd), and a
//! failed notification is logged, never fatal: a daemon that serves but could not tell
//! systemd is better than one that exits. READY=1 is sent by the caller only after the
//! engine has recovered and the listeners are bound, so that systemd starts the
//! database that depends on us only when ids can actually be had.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Tell systemd that the daemon serves, with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tell systemd that shutdown has begun.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Tell systemd that a reload (SIGHUP) has begun; [`ready`] ends it. With
/// `Type=notify-reload` (systemd 253 and later) `systemctl reload` waits for that
/// READY=1; systemd wants the monotonic time beside RELOADING=1 to tell this
/// reload from an earlier one.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the configuration (SIGHUP)"),
        ]),
        Err(e) => tracing::warn!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
    }
}

/// Update the free-form status line shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// If systemd set `WATCHDOG_USEC`, ping it at half that period until `stop`. The pings
/// come from the runtime that serves requests, so a wedged runtime stops pinging and
/// systemd restarts the daemon.
pub fn spawn_watchdog(stop: CancellationToken) -> Option<Duration> {
    let period = sd_notify::watchdog_enabled()? / 2;
    let period = period.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
    Some(period)
}
