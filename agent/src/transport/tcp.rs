//! The data transport: plain TCP connections, one blocking thread per stream.
//!
//! This is the boundary the io_uring data path replaces: the engine only needs a byte sink per
//! stream on the source ([`std::io::Write`]) and a byte source per stream on the destination
//! ([`std::io::Read`]). Data connections are bound to the migration address on the source, so
//! they leave through the migration network.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Socket buffer size asked for on data connections.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// How long a migration connection may go without getting through (a link down, a peer
/// gone silent) before it fails. Shorter outages are ridden out: TCP retransmits, nothing is
/// lost, and the migration carries on from where it was, dirty pages included.
pub const RETRY_WINDOW: Duration = Duration::from_secs(30);

fn tune(s: &Socket) {
    let _ = s.set_tcp_nodelay(true);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = patience(s);
}

/// Bound how long a connection may stall: keepalive probes notice a silent peer when this
/// side only reads, `TCP_USER_TIMEOUT` unacknowledged data when it writes; both give up after
/// about [`RETRY_WINDOW`].
fn patience(s: &Socket) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(((RETRY_WINDOW.as_secs() - 5) / 2) as u32);
    s.set_tcp_keepalive(&ka)?;
    s.set_tcp_user_timeout(Some(RETRY_WINDOW))
}

/// Abort a connection in place: the kernel resets it (RST) and drops whatever is still queued
/// to send, even while other handles on the socket are open. Blocked readers and writers wake
/// with an error, and zero-copy sends still referencing guest pages complete. Used when a
/// migration fails: a graceful shutdown would keep sending the queued bytes at link speed.
pub fn abort(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: connect(2) on a socket we hold, with a valid sockaddr of the size passed; on a
    // TCP socket AF_UNSPEC means "disconnect" (tcp_disconnect). The result only matters as
    // best effort: a fallback shutdown follows.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "disconnect failed; shutting down instead");
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// [`patience`] for a connection made elsewhere (an accepted control connection).
pub fn keepalive(s: &TcpStream) -> io::Result<()> {
    patience(&socket2::SockRef::from(s))
}

/// Put the migration mark on a socket ([`crate::netpin::mark_socket`]). `SO_MARK` needs
/// `CAP_NET_ADMIN`: without it (an agent run by an unprivileged user, as the engine's tests
/// are) the connection goes on unmarked, so the eBPF programs neither pin nor count it, and
/// this is said once. Any other error is returned.
pub fn mark_migration(fd: std::os::fd::RawFd) -> io::Result<()> {
    static UNMARKED: std::sync::Once = std::sync::Once::new();
    match crate::netpin::mark_socket(fd) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            UNMARKED.call_once(|| {
                tracing::warn!(error = %e, "cannot mark migration connections (SO_MARK needs CAP_NET_ADMIN); they go unpinned and uncounted");
            });
            Ok(())
        }
        r => r,
    }
}

/// Connect from `local` (port chosen by the kernel) to `remote`, within `timeout`; with
/// `mark`, the socket carries the migration mark (SO_MARK) for eBPF pinning and accounting.
pub fn connect_from(
    local: Option<IpAddr>,
    remote: SocketAddr,
    timeout: Duration,
    mark: bool,
) -> io::Result<TcpStream> {
    let s = Socket::new(
        Domain::for_address(remote),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    tune(&s);
    if mark {
        use std::os::fd::AsRawFd;
        mark_migration(s.as_raw_fd())?;
    }
    if let Some(ip) = local {
        s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    s.connect_timeout(&SockAddr::from(remote), timeout)?;
    Ok(s.into())
}

/// Listen for data connections on `local`, an ephemeral port.
pub fn listen(local: IpAddr) -> io::Result<TcpListener> {
    let s = Socket::new(
        Domain::for_address(SocketAddr::new(local, 0)),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    tune(&s);
    s.set_reuse_address(true)?;
    s.bind(&SockAddr::from(SocketAddr::new(local, 0)))?;
    s.listen(64)?;
    Ok(s.into())
}

/// Accept one connection before `deadline`; it carries the migration mark (its replies are
/// migration traffic too).
pub fn accept_until(l: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                let _ = keepalive(&s);
                use std::os::fd::AsRawFd;
                mark_migration(s.as_raw_fd())?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no data connection arrived in time",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A peer that is neither a known name nor an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is neither a peer name from [peers] nor an address like 198.18.0.2 or 198.18.0.2:7720"
)]
pub struct BadAddr(pub String);

/// Parse "host:port" or "host" (with `default_port`).
pub fn parse_addr(s: &str, default_port: u16) -> Result<SocketAddr, BadAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err(BadAddr(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("198.18.0.2", 7720).unwrap(),
            "198.18.0.2:7720".parse().unwrap()
        );
        assert_eq!(
            parse_addr("198.18.0.2:9", 7720).unwrap(),
            "198.18.0.2:9".parse().unwrap()
        );
        assert!(parse_addr("b", 7720).is_err());
    }
}
