//! Telling the network where a guest's MACs live: RARP frames from each NIC's MAC out of its
//! port group's interface (what vMotion's "notify switches" and QEMU's announce do), so switches
//! move the MAC to this host's port. Five rounds, 50 ms then growing by 100 ms between rounds,
//! as QEMU does by default. Sent when a guest starts and when it resumes after a migration.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// RARP ethertype.
const ETH_P_RARP: u16 = 0x8035;
/// Rounds and gaps (QEMU's announce-rounds 5, initial 50 ms, step 100 ms).
pub const ROUNDS: u32 = 5;
pub const FIRST_GAP: Duration = Duration::from_millis(50);
pub const GAP_STEP: Duration = Duration::from_millis(100);

/// One NIC's announcement, as recorded in summaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub mac: String,
    pub port_group: String,
    pub interface: String,
    /// Rounds scheduled: the first went out before this record was made, the others follow at
    /// growing gaps (a failed round is logged and ends them; a guest that leaves cancels them).
    pub rounds: u32,
    /// Why it could not be sent, if it could not.
    pub error: Option<String>,
}

/// A RARP "request reverse" frame announcing `mac` (broadcast).
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

fn send_once(ifindex: i32, frame: &[u8]) -> std::io::Result<()> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_RARP.to_be()),
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields we need are set below.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_RARP.to_be();
    sa.sll_ifindex = ifindex;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: sendto with our frame and a sockaddr_ll we own, with its size.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Announce `mac` on `interface`: the first round now, the rest in a background thread, which
/// stops early once `cancel` is set (the guest has left this host).
pub fn announce(
    mac: &str,
    port_group: &str,
    interface: &str,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Announcement {
    let mut a = Announcement {
        mac: mac.into(),
        port_group: port_group.into(),
        interface: interface.into(),
        rounds: ROUNDS,
        error: None,
    };
    let Some(m) = crate::vm::parse_mac(mac) else {
        a.error = Some(format!("{mac:?} is not a MAC address"));
        return a;
    };
    let Ok(cname) = std::ffi::CString::new(interface) else {
        a.error = Some("bad interface name".into());
        return a;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
    if ifindex == 0 {
        a.error = Some(format!("interface {interface} does not exist on this host"));
        return a;
    }
    let frame = rarp_frame(m);
    if let Err(e) = send_once(ifindex, &frame) {
        a.error = Some(format!("sending on {interface}: {e}"));
        return a;
    }
    let (mac_s, iface) = (mac.to_string(), interface.to_string());
    let spawned = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let mut gap = FIRST_GAP;
            for _ in 1..ROUNDS {
                std::thread::sleep(gap);
                gap += GAP_STEP;
                if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                if let Err(e) = send_once(ifindex, &frame) {
                    tracing::warn!(mac = %mac_s, interface = %iface, error = %e, "announcement round failed");
                    return;
                }
            }
        });
    if spawned.is_err() {
        a.rounds = 1;
    }
    tracing::info!(
        mac,
        port_group,
        interface,
        rounds = a.rounds,
        "MAC announced (RARP)"
    );
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let f = rarp_frame([0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[32..38], &f[22..28]);
    }
}
