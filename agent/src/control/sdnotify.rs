//! systemd's readiness and watchdog protocol (`Type=notify`, `WatchdogSec=`): datagrams such as
//! `READY=1` and `WATCHDOG=1` to the socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the
//! abstract namespace). Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Errors talking to the service manager.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot notify the service manager at {socket:?}: {source}")]
    Send {
        socket: String,
        source: std::io::Error,
    },
}

/// Send `state` (e.g. "READY=1") to `socket` (a `$NOTIFY_SOCKET` value).
pub fn notify_to(socket: &str, state: &str) -> Result<(), NotifyError> {
    let err = |source| NotifyError::Send {
        socket: socket.to_string(),
        source,
    };
    let s = UnixDatagram::unbound().map_err(err)?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        s.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
    } else {
        s.send_to(state.as_bytes(), socket).map_err(err)?;
    }
    Ok(())
}

/// Send `state` to the service manager, if there is one.
pub fn notify(state: &str) {
    if let Ok(socket) = std::env::var("NOTIFY_SOCKET") {
        if let Err(e) = notify_to(&socket, state) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if the watchdog is on for this
/// process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(me)) {
        return None;
    }
    let us: u64 = usec?.parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(us / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_arrive_on_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("ferry-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("ferry-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "WATCHDOG=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        assert!(notify_to("/nonexistent/ferry.sock", "READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_us() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("zero"), None, 7), None);
    }
}
