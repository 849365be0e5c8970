//! A tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`) enslaved to a bridge: the host side of a
//! virtio NIC. The tap is not persistent: it disappears when its file descriptor closes, so a
//! VM that goes (destroyed, migrated away) takes its tap with it.
//!
//! The tap's own MAC is the guest's with the first byte 0xfe (as libvirt does), so the bridge
//! never takes the guest's address for one of its own ports.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::VirtioError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const ARPHRD_ETHER: u16 = 1;

/// The tap's name for NIC `i` of VM `vm`: `fy` and 8 hex digits (stable, at most 15 bytes).
pub fn tap_name(vm: &str, i: usize) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in vm
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain((i as u32).to_le_bytes())
    {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("fy{h:08x}")
}

/// The MAC the tap itself gets for a guest MAC.
pub fn tap_mac(guest: &[u8; 6]) -> [u8; 6] {
    let mut m = *guest;
    m[0] = 0xfe;
    m
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub bridge: String,
    fd: OwnedFd,
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1-15 bytes"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// An AF_INET datagram socket for interface ioctls.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request used here reads and/or writes one `struct ifreq`, which `r` is.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, r as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Create tap `name` with the MAC derived from `guest_mac`, enslave it to `bridge` and set
    /// it up. The descriptor is non-blocking.
    pub fn create(name: &str, bridge: &str, guest_mac: &[u8; 6]) -> Result<Tap, VirtioError> {
        let path = c"/dev/net/tun";
        // SAFETY: open(2) of a constant NUL-terminated path; the result is checked and owned.
        let raw = unsafe {
            libc::open(
                CStr::as_ptr(path),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(VirtioError::TunOpen(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let create_err = |source| VirtioError::TapCreate {
            name: name.to_string(),
            source,
        };
        let mut r = ifreq(name).map_err(create_err)?;
        r.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        ioctl(&fd, TUNSETIFF, &mut r).map_err(create_err)?;
        let tap = Tap {
            name: name.to_string(),
            bridge: bridge.to_string(),
            fd,
        };
        let cfg = |what: &'static str| {
            let tap = name.to_string();
            move |source| VirtioError::TapConfig { tap, what, source }
        };
        let sock = ctl_socket().map_err(cfg("control socket"))?;
        // MAC.
        let mut r = ifreq(name).map_err(cfg("name"))?;
        // SAFETY: writing the sockaddr member of the union we then pass to SIOCSIFHWADDR.
        unsafe {
            r.ifr_ifru.ifru_hwaddr.sa_family = ARPHRD_ETHER;
            for (d, s) in r
                .ifr_ifru
                .ifru_hwaddr
                .sa_data
                .iter_mut()
                .zip(tap_mac(guest_mac))
            {
                *d = s as libc::c_char;
            }
        }
        ioctl(&sock, SIOCSIFHWADDR, &mut r).map_err(cfg("set MAC"))?;
        // Enslave to the bridge.
        let mut r = ifreq(name).map_err(cfg("name"))?;
        ioctl(&sock, SIOCGIFINDEX, &mut r).map_err(cfg("interface index"))?;
        // SAFETY: SIOCGIFINDEX filled the ifindex member.
        let index = unsafe { r.ifr_ifru.ifru_ifindex };
        let bridge_err = |source| VirtioError::Bridge {
            tap: name.to_string(),
            bridge: bridge.to_string(),
            source,
        };
        let mut b = ifreq(bridge).map_err(bridge_err)?;
        b.ifr_ifru.ifru_ifindex = index;
        ioctl(&sock, SIOCBRADDIF, &mut b).map_err(bridge_err)?;
        // Link up.
        let mut r = ifreq(name).map_err(cfg("name"))?;
        ioctl(&sock, SIOCGIFFLAGS, &mut r).map_err(cfg("read flags"))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        ioctl(&sock, SIOCSIFFLAGS, &mut r).map_err(cfg("set up"))?;
        tracing::info!(tap = name, bridge, "tap created on the port group's bridge");
        Ok(tap)
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// A tap another process opened and handed over (a VMM's NIC, given to the agent's
    /// forwarder after a migration): same frames, same bridge.
    pub fn from_fd(name: String, bridge: String, fd: OwnedFd) -> Tap {
        Tap { name, bridge, fd }
    }

    /// Read one frame (non-blocking: `WouldBlock` when none is waiting).
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into a buffer we own, at most its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Write one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write(2) from a buffer we own, exactly its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        tracing::info!(tap = %self.name, "tap removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_distinct() {
        let a = tap_name("vm1", 0);
        assert_eq!(a, tap_name("vm1", 0));
        assert!(a.len() <= 15 && a.starts_with("fy"));
        assert_ne!(a, tap_name("vm1", 1));
        assert_ne!(a, tap_name("vm2", 0));
        assert_eq!(tap_mac(&[0x52, 0x54, 0, 1, 2, 3]), [0xfe, 0x54, 0, 1, 2, 3]);
    }
}
