//! What the guest serves on its address, with smoltcp over the virtio-net device: ICMP echo
//! (answered by the interface itself), UDP and TCP echo, the TCP counter stream and the journal
//! status.

use crate::ferry_guest_abi::service::JournalStatus;
use crate::ferry_guest_abi::{
    counter_record, BootInfo, COUNTER_PORT, COUNTER_RECORD, JOURNAL_PORT, TCP_ECHO_PORT,
    UDP_ECHO_PORT,
};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use crate::mem;
use crate::net::{NetDev, NetStats};
use crate::println;

/// TCP echo connections served at once.
const ECHO_SOCKETS: usize = 4;
/// Counter-stream connections served at once.
const COUNTER_SOCKETS: usize = 2;
const ECHO_BUF: usize = 16 * 1024;
/// A multiple of COUNTER_RECORD, so records never straddle the ring's end.
const COUNTER_TX: usize = 256 * 1024;
const COUNTER_RX: usize = 2 * 1024;
const UDP_SLOTS: usize = 16;
const UDP_BUF: usize = 16 * 1024;
const SOCKETS: usize = ECHO_SOCKETS + COUNTER_SOCKETS + 2;

struct Counter {
    handle: SocketHandle,
    /// Next record to queue on this connection (0 for every new connection).
    seq: u64,
}

pub struct Services {
    dev: NetDev,
    iface: Interface,
    sockets: SocketSet<'static>,
    echo: [SocketHandle; ECHO_SOCKETS],
    counters: [Counter; COUNTER_SOCKETS],
    udp_echo: SocketHandle,
    udp_journal: SocketHandle,
    last: NetStats,
}

fn ms(now_us: u64) -> Instant {
    Instant::from_micros(now_us as i64)
}

fn tcp_socket(rx: usize, tx: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(mem::alloc_bytes(rx, 64)),
        tcp::SocketBuffer::new(mem::alloc_bytes(tx, 64)),
    )
}

fn udp_socket() -> udp::Socket<'static> {
    let meta = || {
        let m = mem::alloc_zeroed::<[udp::PacketMetadata; UDP_SLOTS]>();
        for x in m.iter_mut() {
            *x = udp::PacketMetadata::EMPTY;
        }
        &mut m[..]
    };
    udp::Socket::new(
        udp::PacketBuffer::new(meta(), mem::alloc_bytes(UDP_BUF, 64)),
        udp::PacketBuffer::new(meta(), mem::alloc_bytes(UDP_BUF, 64)),
    )
}

impl Services {
    pub fn new(mut dev: NetDev, info: &BootInfo, now_us: u64) -> Services {
        let mac = dev.mac();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = crate::arch::rdtsc()
            ^ u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0]);
        let mut iface = Interface::new(config, &mut dev, ms(now_us));
        let ip = Ipv4Address::from(info.ipv4);
        let prefix = info.prefix_len.min(32);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(ip.into(), prefix));
        });
        if info.gateway != [0; 4] {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::from(info.gateway));
        }
        let storage = mem::alloc_zeroed::<[SocketStorage<'static>; SOCKETS]>();
        for s in storage.iter_mut() {
            *s = SocketStorage::EMPTY;
        }
        let mut sockets = SocketSet::new(&mut storage[..]);
        let echo = core::array::from_fn(|_| {
            let mut s = tcp_socket(ECHO_BUF, ECHO_BUF);
            s.set_nagle_enabled(false);
            sockets.add(s)
        });
        let counters = core::array::from_fn(|_| Counter {
            handle: sockets.add(tcp_socket(COUNTER_RX, COUNTER_TX)),
            seq: 0,
        });
        let mut u = udp_socket();
        let _ = u.bind(UDP_ECHO_PORT);
        let udp_echo = sockets.add(u);
        let mut u = udp_socket();
        let _ = u.bind(JOURNAL_PORT);
        let udp_journal = sockets.add(u);
        println!(
            "ferry-guest: serving icmp echo, udp {UDP_ECHO_PORT} echo, tcp {TCP_ECHO_PORT} echo (x{ECHO_SOCKETS}), tcp {COUNTER_PORT} counter (x{COUNTER_SOCKETS}), udp {JOURNAL_PORT} journal status on {}.{}.{}.{}; mac {mac:02x?}",
            info.ipv4[0], info.ipv4[1], info.ipv4[2], info.ipv4[3]
        );
        let mut s = Services {
            dev,
            iface,
            sockets,
            echo,
            counters,
            udp_echo,
            udp_journal,
            last: NetStats::default(),
        };
        s.relisten();
        s
    }

    pub fn mac(&self) -> [u8; 6] {
        self.dev.mac()
    }

    pub fn tx_in_flight(&self) -> bool {
        self.dev.tx_in_flight()
    }

    /// Listen again on sockets whose connection ended; a new counter connection starts at 0.
    fn relisten(&mut self) {
        for h in self.echo {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::CloseWait {
                s.close();
            }
            if !s.is_open() {
                let _ = s.listen(TCP_ECHO_PORT);
            }
        }
        for c in &mut self.counters {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if s.state() == tcp::State::CloseWait {
                s.close();
            }
            if !s.is_open() {
                let _ = s.listen(COUNTER_PORT);
                c.seq = 0;
            }
        }
    }

    /// Run the stack and the services once. Returns whether anything moved.
    pub fn poll(&mut self, now_us: u64, journal: Option<JournalStatus>) -> bool {
        self.dev.housekeep();
        self.iface
            .poll(ms(now_us), &mut self.dev, &mut self.sockets);
        self.relisten();
        // TCP echo: move what arrived into the send buffer, as far as it has room.
        for h in self.echo {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            while s.can_recv() && s.can_send() {
                let room = s.send_capacity() - s.send_queue();
                let mut chunk = [0u8; 2048];
                let want = room.min(chunk.len());
                if want == 0 {
                    break;
                }
                match s.recv_slice(&mut chunk[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = s.send_slice(&chunk[..n]);
                    }
                }
            }
        }
        // Counter stream: keep the send buffer full of whole records; ignore what comes in.
        for c in &mut self.counters {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            while s.can_recv() {
                if s.recv(|b| (b.len(), ())).is_err() {
                    break;
                }
            }
            while s.can_send() {
                let seq = &mut c.seq;
                let wrote = s
                    .send(|buf| {
                        let n = buf.len() / COUNTER_RECORD;
                        for r in buf[..n * COUNTER_RECORD].chunks_exact_mut(COUNTER_RECORD) {
                            r.copy_from_slice(&counter_record(*seq));
                            *seq += 1;
                        }
                        (n * COUNTER_RECORD, n)
                    })
                    .unwrap_or(0);
                if wrote == 0 {
                    break;
                }
            }
        }
        // UDP echo and journal status.
        let s = self.sockets.get_mut::<udp::Socket>(self.udp_echo);
        let mut buf = [0u8; 2048];
        while let Ok((n, meta)) = s.recv_slice(&mut buf) {
            let _ = s.send_slice(&buf[..n], meta.endpoint);
        }
        let s = self.sockets.get_mut::<udp::Socket>(self.udp_journal);
        while let Ok((_, meta)) = s.recv_slice(&mut buf) {
            let st = journal.unwrap_or(JournalStatus {
                next_seq: 0,
                verified: 0,
                check_passed: false,
            });
            let _ = s.send_slice(&st.to_bytes(), meta.endpoint);
        }
        // Send what the services queued.
        self.iface
            .poll(ms(now_us), &mut self.dev, &mut self.sockets);
        let st = self.dev.stats;
        let moved = st.rx_packets != self.last.rx_packets || st.tx_packets != self.last.tx_packets;
        self.last = st;
        moved
    }

    /// Microseconds until the stack wants to run again (timers: retransmission, delayed ACK).
    pub fn until_next_us(&mut self, now_us: u64) -> u64 {
        match self.iface.poll_delay(ms(now_us), &self.sockets) {
            Some(d) => d.total_micros(),
            None => u64::MAX,
        }
    }
}
