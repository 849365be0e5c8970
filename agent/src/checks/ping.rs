//! `ferry ping PEER`: ICMP echo from this host's migration address, through the migration NIC
//! only (SO_BINDTODEVICE), to the peer's migration address — the vmkping of vMotion. Round trip
//! min/avg/max, loss, and path-MTU probes with the don't-fragment bit at 1500 and 9000 bytes.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Result of one path-MTU probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MtuProbe {
    /// IPv4 packet size probed.
    pub size: u32,
    pub ok: bool,
    pub detail: String,
}

/// Result of `ferry ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    pub local: String,
    pub remote: String,
    pub interface: Option<String>,
    pub sent: u32,
    pub received: u32,
    pub loss_percent: f64,
    pub rtt_min_ms: Option<f64>,
    pub rtt_avg_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    pub mtu: Vec<MtuProbe>,
}

/// Errors of the probe.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error(transparent)]
    Random(#[from] crate::util::UtilError),
    #[error("cannot open an ICMP socket (needs root / CAP_NET_RAW): {0}")]
    Socket(std::io::Error),
    #[error("cannot bind the probe to {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(id: u16, seq: u16, payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 8 + payload];
    p[0] = 8; // echo request
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

struct Icmp {
    socket: Socket,
    remote: SockAddr,
}

impl Icmp {
    fn open(local: Ipv4Addr, remote: Ipv4Addr, iface: Option<&str>) -> Result<Icmp, PingError> {
        // socket2 opens it close-on-exec.
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .map_err(PingError::Socket)?;
        if let Some(dev) = iface {
            socket
                .bind_device(Some(dev.as_bytes()))
                .map_err(|source| PingError::Bind {
                    what: format!("interface {dev}"),
                    source,
                })?;
        }
        let _ = socket.set_mark(crate::netpin::MIGRATION_MARK);
        socket
            .bind(&SocketAddrV4::new(local, 0).into())
            .map_err(|source| PingError::Bind {
                what: format!("address {local}"),
                source,
            })?;
        Ok(Icmp {
            socket,
            remote: SocketAddrV4::new(remote, 0).into(),
        })
    }

    /// Probe the path MTU: set the don't-fragment bit and let sends larger than the local
    /// interface's MTU fail with EMSGSIZE (`IP_PMTUDISC_PROBE`, which socket2 does not offer).
    fn dont_fragment(&self) {
        let val: libc::c_int = libc::IP_PMTUDISC_PROBE;
        // SAFETY: setsockopt(2) on a socket we own, reading one c_int that lives across the
        // call, with its size.
        let _ = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }

    fn send(&self, pkt: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(pkt, &self.remote).map(|_| ())
    }

    /// Wait for the echo reply to (id, seq) until `deadline`.
    fn reply(&self, id: u16, seq: u16, deadline: Instant) -> bool {
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self
                .socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .is_err()
            {
                return false;
            }
            // A raw socket reads whole IPv4 packets; a timeout or an error tries again until
            // the deadline.
            let n = match (&self.socket).read(&mut buf) {
                Ok(n) if n > 0 => n,
                _ => continue,
            };
            let b = &buf[..n];
            let ihl = usize::from(b.first().map_or(0, |v| v & 0x0f)) * 4;
            if b.len() < ihl + 8 {
                continue;
            }
            let icmp = &b[ihl..];
            let rid = u16::from_be_bytes([icmp[4], icmp[5]]);
            let rseq = u16::from_be_bytes([icmp[6], icmp[7]]);
            if icmp[0] == 0 && rid == id && rseq == seq {
                return true;
            }
        }
    }
}

/// Ping `remote` from `local` through `iface`: `count` echoes `interval` apart (each waits up to
/// `timeout`), then one don't-fragment probe each at 1500 and 9000 bytes.
pub fn ping(
    local: Ipv4Addr,
    remote: Ipv4Addr,
    iface: Option<&str>,
    count: u32,
    interval: Duration,
    timeout: Duration,
) -> Result<PingReport, PingError> {
    let s = Icmp::open(local, remote, iface)?;
    let id = (crate::util::random_u64()? & 0xffff) as u16;
    let mut rtts = Vec::new();
    for seq in 0..count as u16 {
        let t = Instant::now();
        if s.send(&echo_request(id, seq, 56)).is_ok() && s.reply(id, seq, t + timeout) {
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        if seq + 1 < count as u16 {
            std::thread::sleep(interval.saturating_sub(t.elapsed()));
        }
    }
    s.dont_fragment();
    let mut mtu = Vec::new();
    for (k, size) in [1500u32, 9000].into_iter().enumerate() {
        let seq = 1000 + k as u16;
        let payload = size as usize - 28;
        let t = Instant::now();
        let probe = match s.send(&echo_request(id, seq, payload)) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => MtuProbe {
                size,
                ok: false,
                detail: "larger than the local interface's MTU".into(),
            },
            Err(e) => MtuProbe {
                size,
                ok: false,
                detail: format!("not sent: {e}"),
            },
            Ok(()) if s.reply(id, seq, t + timeout) => MtuProbe {
                size,
                ok: true,
                detail: format!("reply in {:.2} ms", t.elapsed().as_secs_f64() * 1000.0),
            },
            Ok(()) => MtuProbe {
                size,
                ok: false,
                detail: "no reply: dropped on the path (MTU, firewall or link down)".into(),
            },
        };
        mtu.push(probe);
    }
    let received = rtts.len() as u32;
    let avg = (!rtts.is_empty()).then(|| rtts.iter().sum::<f64>() / rtts.len() as f64);
    Ok(PingReport {
        local: local.to_string(),
        remote: remote.to_string(),
        interface: iface.map(str::to_string),
        sent: count,
        received,
        loss_percent: if count == 0 {
            0.0
        } else {
            100.0 * f64::from(count - received) / f64::from(count)
        },
        rtt_min_ms: rtts.iter().copied().reduce(f64::min),
        rtt_avg_ms: avg,
        rtt_max_ms: rtts.iter().copied().reduce(f64::max),
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_checksum_verifies() {
        let p = echo_request(0x1234, 7, 56);
        assert_eq!(p.len(), 64);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        assert_eq!(checksum(&[0x45, 0x00, 0x00, 0x1c]), !(0x4500u16 + 0x001c));
    }
}
