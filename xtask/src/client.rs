//! A client of a service guest, seen from outside it: the tools the continuity tests run in the
//! lab's client namespace (`ferry-NAME-cl`, on the switch's bridge, port group `vm-net`).
//!
//! - [`Pinger`]: `ping -i 0.01 -D` in the namespace; per-reply times, the largest gap between
//!   replies, the sequence numbers never answered.
//! - [`CounterReader`]: reads the guest's TCP counter stream (port 19) continuously on a thread
//!   in the namespace; records the largest stall, any gap or repeat in the sequence, corrupt
//!   records, and a reset.
//! - [`EchoConnection`]: an established TCP echo connection (port 7) that can sit idle and be
//!   checked later.
//! - [`journal_status`]: asks UDP port 5000 for the last durable journal record.
//! - [`fdb_port`]: which port of a bridge has last seen a MAC.
//!
//! Sockets are created on a thread that entered the namespace (`setns`); a socket keeps its
//! namespace for life, so the connection can then be used from any thread. Every wait is
//! bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_guest_abi::service::JournalStatus;
use ferry_guest_abi::{
    parse_counter_record, COUNTER_PORT, COUNTER_RECORD, JOURNAL_PORT, TCP_ECHO_PORT,
};

fn enter_netns(netns: &str) -> Result<()> {
    let path = format!("/run/netns/{netns}");
    let fd = std::fs::File::open(&path)
        .with_context(|| format!("opening {path}: does the lab's namespace {netns} exist?"))?;
    // SAFETY: setns on the calling thread only, with a namespace fd we hold open.
    let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        bail!("setns into {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` on a fresh thread inside `netns` and return its result.
pub fn with_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&netns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// A TCP connection made from inside `netns`, with a connect timeout.
pub fn connect_in(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    with_netns(netns, move || {
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))
    })
}

// ---------------------------------------------------------------------------------------------
// ping
// ---------------------------------------------------------------------------------------------

/// One echo reply: its sequence number, when it arrived (ping's `-D` clock, seconds) and its
/// round-trip time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingReply {
    pub seq: u64,
    pub at_s: f64,
    pub rtt_ms: f64,
}

/// What a [`Pinger`] saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PingReport {
    pub replies: Vec<PingReply>,
    /// From ping's summary (None if it printed none).
    pub transmitted: Option<u64>,
    pub received: Option<u64>,
    /// Sequence numbers up to the last one answered that got no reply.
    pub lost: Vec<u64>,
    pub duplicates: u64,
    /// Largest time between two consecutive replies, ms.
    pub max_gap_ms: f64,
    pub max_rtt_ms: f64,
}

impl PingReport {
    /// The replies that arrived between `from_s` and `to_s` (ping's `-D` clock: seconds since
    /// the epoch), with the sequence numbers lost among them and the largest gap between them
    /// (counting from the last reply before the window and to the first one after it).
    pub fn window(&self, from_s: f64, to_s: f64) -> (usize, Vec<u64>, f64) {
        let first = self
            .replies
            .iter()
            .rposition(|r| r.at_s < from_s)
            .unwrap_or(0);
        let last = self
            .replies
            .iter()
            .position(|r| r.at_s > to_s)
            .unwrap_or(self.replies.len().saturating_sub(1));
        if self.replies.is_empty() || last < first {
            return (0, Vec::new(), 0.0);
        }
        let w = &self.replies[first..=last];
        let gap = w
            .windows(2)
            .map(|p| (p[1].at_s - p[0].at_s) * 1000.0)
            .fold(0.0, f64::max);
        let (lo, hi) = (w[0].seq, w[w.len() - 1].seq);
        let lost = self
            .lost
            .iter()
            .copied()
            .filter(|s| *s > lo && *s < hi)
            .collect();
        (w.len(), lost, gap)
    }

    /// Parse `ping -D` output.
    pub fn parse(text: &str) -> PingReport {
        let mut r = PingReport::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                let Some((ts, rest)) = rest.split_once(']') else {
                    continue;
                };
                if !rest.contains("bytes from") {
                    continue;
                }
                let field = |name: &str| {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .map(str::to_owned)
                };
                let (Ok(at_s), Some(seq), Some(rtt)) =
                    (ts.parse::<f64>(), field("icmp_seq="), field("time="))
                else {
                    continue;
                };
                let (Ok(seq), Ok(rtt_ms)) = (seq.parse::<u64>(), rtt.parse::<f64>()) else {
                    continue;
                };
                if rest.contains("DUP!") {
                    r.duplicates += 1;
                    continue;
                }
                r.replies.push(PingReply { seq, at_s, rtt_ms });
            } else if line.contains("packets transmitted") {
                let nums: Vec<u64> = line
                    .split(',')
                    .filter_map(|p| p.split_whitespace().next()?.parse().ok())
                    .collect();
                r.transmitted = nums.first().copied();
                r.received = nums.get(1).copied();
            }
        }
        let mut seqs: Vec<u64> = r.replies.iter().map(|p| p.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        if let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) {
            let first = first.min(1);
            let have: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
            r.lost = (first..=last).filter(|s| !have.contains(s)).collect();
        }
        r.max_gap_ms = r
            .replies
            .windows(2)
            .map(|w| (w[1].at_s - w[0].at_s) * 1000.0)
            .fold(0.0, f64::max);
        r.max_rtt_ms = r.replies.iter().map(|p| p.rtt_ms).fold(0.0, f64::max);
        r
    }
}

/// `ping -i 0.01 -D -n ADDR` running in a namespace until [`Pinger::stop`] (or `max` has passed:
/// ping's own `-w` deadline bounds it).
pub struct Pinger {
    child: Option<Child>,
    out: Option<JoinHandle<String>>,
}

/// The `ping` binary (iputils-ping), or an error that says how to install it.
pub fn ping_bin() -> Result<&'static str> {
    for p in ["/usr/bin/ping", "/bin/ping"] {
        if std::path::Path::new(p).exists() {
            return Ok(p);
        }
    }
    bail!("`ping` is not installed (Debian package iputils-ping): `cargo xtask deps` installs it")
}

impl Pinger {
    pub fn start(netns: &str, addr: Ipv4Addr, interval: Duration, max: Duration) -> Result<Pinger> {
        let ping = ping_bin()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, ping, "-n", "-D"])
            .arg("-i")
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg("-W")
            .arg("1")
            .arg("-w")
            .arg(max.as_secs().max(1).to_string())
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ping in the client namespace")?;
        let mut stdout = child.stdout.take().context("ping stdout")?;
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Ok(Pinger {
            child: Some(child),
            out: Some(out),
        })
    }

    /// Stop ping (SIGINT, so it prints its summary; by PID) and parse what it printed.
    pub fn stop(mut self) -> Result<PingReport> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped. `ip netns
        // exec` execs ping, so the PID is ping's.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let text = self
            .out
            .take()
            .context("output")?
            .join()
            .map_err(|_| anyhow::anyhow!("ping reader panicked"))?;
        let report = PingReport::parse(&text);
        if report.transmitted.is_none() {
            bail!("ping printed no summary ({status}): {err}{text}");
        }
        Ok(report)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The counter stream
// ---------------------------------------------------------------------------------------------

/// What a [`CounterReader`] saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CounterReport {
    /// Valid records read.
    pub records: u64,
    /// The sequence number expected next (last seen + 1).
    pub next_seq: u64,
    /// `(expected, got)` where a record jumped ahead.
    pub gaps: Vec<(u64, u64)>,
    /// `(expected, got)` where a record went back (a repeat).
    pub repeats: Vec<(u64, u64)>,
    /// Records whose check failed.
    pub corrupt: u64,
    /// The longest time between two reads that brought data, after the first record.
    pub max_stall: Duration,
    /// The connection was reset (ECONNRESET or similar).
    pub reset: bool,
    /// The guest closed the connection.
    pub eof: bool,
    /// Any other read error.
    pub error: Option<String>,
}

impl CounterReport {
    /// No gap, no repeat, no corrupt record, no reset, no close, no error.
    pub fn clean(&self) -> bool {
        self.gaps.is_empty()
            && self.repeats.is_empty()
            && self.corrupt == 0
            && !self.reset
            && !self.eof
            && self.error.is_none()
    }
}

/// Checks a byte stream of counter records, however it is cut into reads.
#[derive(Debug, Default)]
pub struct CounterCheck {
    partial: Vec<u8>,
    pub report: CounterReport,
}

impl CounterCheck {
    pub fn feed(&mut self, mut data: &[u8]) {
        let r = &mut self.report;
        if !self.partial.is_empty() {
            let need = COUNTER_RECORD - self.partial.len();
            let take = need.min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < COUNTER_RECORD {
                return;
            }
            let rec: [u8; COUNTER_RECORD] = self.partial[..].try_into().expect("16 bytes");
            Self::one(r, &rec);
            self.partial.clear();
        }
        let mut chunks = data.chunks_exact(COUNTER_RECORD);
        for c in &mut chunks {
            Self::one(r, c.try_into().expect("16 bytes"));
        }
        self.partial.extend_from_slice(chunks.remainder());
    }

    fn one(r: &mut CounterReport, rec: &[u8; COUNTER_RECORD]) {
        match parse_counter_record(rec) {
            None => r.corrupt += 1,
            Some(seq) => {
                if seq > r.next_seq {
                    r.gaps.push((r.next_seq, seq));
                } else if seq < r.next_seq {
                    r.repeats.push((r.next_seq, seq));
                }
                r.records += 1;
                r.next_seq = seq + 1;
            }
        }
    }
}

/// Reads the counter stream on its own thread until stopped.
pub struct CounterReader {
    stop: Arc<AtomicBool>,
    records: Arc<AtomicU64>,
    /// Largest stall since the last [`CounterReader::take_stall`], microseconds.
    stall_us: Arc<AtomicU64>,
    handle: Option<JoinHandle<CounterReport>>,
}

impl CounterReader {
    /// Connect from `netns` to the guest's counter port and start reading. The reader gives up
    /// by itself after `max`.
    pub fn start(netns: &str, guest: Ipv4Addr, max: Duration) -> Result<CounterReader> {
        let addr = SocketAddr::from((guest, COUNTER_PORT));
        let mut stream = connect_in(netns, addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(AtomicU64::new(0));
        let stall_us = Arc::new(AtomicU64::new(0));
        let (stop2, records2, stall2) = (stop.clone(), records.clone(), stall_us.clone());
        let handle = std::thread::spawn(move || {
            let mut check = CounterCheck::default();
            let mut buf = vec![0u8; 256 * 1024];
            let started = Instant::now();
            let mut last_data: Option<Instant> = None;
            while !stop2.load(Ordering::Relaxed) && started.elapsed() < max {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        check.report.eof = true;
                        break;
                    }
                    Ok(n) => {
                        let now = Instant::now();
                        if let Some(prev) = last_data {
                            check.report.max_stall = check.report.max_stall.max(now - prev);
                            stall2.fetch_max((now - prev).as_micros() as u64, Ordering::Relaxed);
                        }
                        last_data = Some(now);
                        check.feed(&buf[..n]);
                        records2.store(check.report.records, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                        ) =>
                    {
                        check.report.reset = true;
                        break;
                    }
                    Err(e) => {
                        check.report.error = Some(e.to_string());
                        break;
                    }
                }
            }
            check.report
        });
        Ok(CounterReader {
            stop,
            records,
            stall_us,
            handle: Some(handle),
        })
    }

    /// Valid records read so far.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// The largest stall since the last call (or the start), and start a new window.
    pub fn take_stall(&self) -> Duration {
        Duration::from_micros(self.stall_us.swap(0, Ordering::Relaxed))
    }

    /// Stop reading and report.
    pub fn stop(mut self) -> CounterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|_| CounterReport {
                error: Some("reader thread panicked".into()),
                ..Default::default()
            })
    }
}

impl Drop for CounterReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An idle echo connection, the journal status, the FDB
// ---------------------------------------------------------------------------------------------

/// An established TCP connection to the guest's echo port, meant to sit idle.
pub struct EchoConnection {
    stream: TcpStream,
    n: u64,
}

impl EchoConnection {
    pub fn open(netns: &str, guest: Ipv4Addr) -> Result<EchoConnection> {
        let stream = connect_in(
            netns,
            SocketAddr::from((guest, TCP_ECHO_PORT)),
            Duration::from_secs(5),
        )?;
        stream.set_nodelay(true)?;
        let mut c = EchoConnection { stream, n: 0 };
        c.check(Duration::from_secs(5))?;
        Ok(c)
    }

    /// Send a fresh message and read it back within `timeout`; the round trip time.
    pub fn check(&mut self, timeout: Duration) -> Result<Duration> {
        self.n += 1;
        let msg = format!("ferry echo check {} {:?}\n", self.n, Instant::now());
        let t0 = Instant::now();
        self.stream
            .write_all(msg.as_bytes())
            .context("sending on the echo connection")?;
        let mut got = vec![0u8; msg.len()];
        let mut have = 0;
        while have < got.len() {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                bail!(
                    "the echo connection returned {have} of {} bytes within {timeout:?}",
                    got.len()
                );
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut got[have..]) {
                Ok(0) => bail!("the guest closed the echo connection"),
                Ok(n) => have += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading from the echo connection"),
            }
        }
        if got != msg.as_bytes() {
            bail!(
                "the echo connection returned {:?}, sent {msg:?}",
                String::from_utf8_lossy(&got)
            );
        }
        Ok(t0.elapsed())
    }
}

/// Ask the guest's journal port (UDP 5000) for its status: up to `tries` datagrams, each
/// waiting `wait` for the answer.
pub fn journal_status(
    netns: &str,
    guest: Ipv4Addr,
    tries: u32,
    wait: Duration,
) -> Result<JournalStatus> {
    let sock = with_netns(netns, || Ok(UdpSocket::bind("0.0.0.0:0")?))?;
    sock.set_read_timeout(Some(wait))?;
    let to = SocketAddr::from((guest, JOURNAL_PORT));
    let mut buf = [0u8; 256];
    for _ in 0..tries.max(1) {
        sock.send_to(b"status?", to)?;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == to => {
                    return JournalStatus::from_bytes(&buf[..n]).with_context(|| {
                        format!("{to} answered {n} bytes that are not a journal status")
                    })
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => return Err(e).context("waiting for the journal status"),
            }
        }
    }
    bail!("no journal status from {to} after {tries} tries of {wait:?}")
}

/// The port of bridge `bridge` (in `netns`) on which `mac` was last seen, from `bridge -j fdb`.
pub fn fdb_port(netns: &str, bridge: &str, mac: &str) -> Result<Option<String>> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", netns, "bridge", "-j", "fdb", "show", "br", bridge,
        ])
        .output()
        .context("running `bridge fdb show`")?;
    if !out.status.success() {
        bail!(
            "`bridge fdb show br {bridge}` in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(fdb_port_of(&String::from_utf8_lossy(&out.stdout), mac))
}

/// The `ifname` of the FDB entry for `mac` in `bridge -j fdb show` output (not the bridge's own
/// or permanent entries).
pub fn fdb_port_of(json: &str, mac: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.as_array()?
        .iter()
        .filter(|e| {
            e["mac"]
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case(mac))
        })
        .filter(|e| {
            !e["state"]
                .as_str()
                .is_some_and(|s| s == "permanent" || s == "static")
        })
        .find_map(|e| e["ifname"].as_str().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_guest_abi::counter_record;

    #[test]
    fn ping_output_is_parsed_with_gaps_and_losses() {
        let text = "PING 198.18.2.10 (198.18.2.10) 56(84) bytes of data.
[1000.000000] 64 bytes from 198.18.2.10: icmp_seq=1 ttl=64 time=0.101 ms
[1000.010000] 64 bytes from 198.18.2.10: icmp_seq=2 ttl=64 time=0.202 ms
[1000.040000] 64 bytes from 198.18.2.10: icmp_seq=5 ttl=64 time=3.5 ms
[1000.040100] 64 bytes from 198.18.2.10: icmp_seq=5 ttl=64 time=3.6 ms (DUP!)
[1000.050000] 64 bytes from 198.18.2.10: icmp_seq=6 ttl=64 time=0.150 ms

--- 198.18.2.10 ping statistics ---
7 packets transmitted, 4 received, +1 duplicates, 42.8571% packet loss, time 60ms
";
        let r = PingReport::parse(text);
        assert_eq!(r.replies.len(), 4);
        assert_eq!(r.transmitted, Some(7));
        assert_eq!(r.received, Some(4));
        assert_eq!(r.lost, vec![3, 4]);
        assert_eq!(r.duplicates, 1);
        assert!((r.max_gap_ms - 30.0).abs() < 1e-6, "{}", r.max_gap_ms);
        assert!((r.max_rtt_ms - 3.5).abs() < 1e-9);
        // The window around the gap: the replies just before and after it count.
        let (n, lost, gap) = r.window(1000.015, 1000.035);
        assert_eq!((n, lost), (2, vec![3, 4]));
        assert!((gap - 30.0).abs() < 1e-6, "{gap}");
        let (n, lost, _) = r.window(1000.045, 1000.046);
        assert_eq!((n, lost), (2, vec![]));
        // Nothing answered at all.
        let r = PingReport::parse("--- x ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss, time 2ms\n");
        assert_eq!((r.transmitted, r.received), (Some(3), Some(0)));
        assert!(r.replies.is_empty() && r.lost.is_empty());
    }

    #[test]
    fn counter_check_finds_gaps_repeats_and_damage_across_any_cut() {
        let mut stream = Vec::new();
        for s in [0u64, 1, 2, 5, 6, 4, 5] {
            stream.extend_from_slice(&counter_record(s));
        }
        let mut bad = counter_record(7);
        bad[0] ^= 1;
        stream.extend_from_slice(&bad);
        for cut in [1usize, 3, 7, 16, 17, 1000] {
            let mut c = CounterCheck::default();
            for piece in stream.chunks(cut) {
                c.feed(piece);
            }
            let r = &c.report;
            assert_eq!(r.records, 7, "cut {cut}");
            assert_eq!(r.gaps, vec![(3, 5)]);
            assert_eq!(r.repeats, vec![(7, 4)]);
            assert_eq!(r.corrupt, 1);
            assert_eq!(r.next_seq, 6);
            assert!(!r.clean());
        }
        let mut c = CounterCheck::default();
        for s in 0..100u64 {
            c.feed(&counter_record(s));
        }
        assert!(c.report.clean());
        assert_eq!(c.report.next_seq, 100);
    }

    #[test]
    fn fdb_entries_are_found_by_mac() {
        let json = r#"[{"mac":"52:54:00:12:34:56","ifname":"a-up","master":"br0","state":""},
            {"mac":"52:54:00:12:34:56","ifname":"br0","vlan":1,"master":"br0","state":"permanent"},
            {"mac":"aa:bb:cc:dd:ee:ff","ifname":"b-up","master":"br0","state":""}]"#;
        assert_eq!(
            fdb_port_of(json, "52:54:00:12:34:56").as_deref(),
            Some("a-up")
        );
        assert_eq!(
            fdb_port_of(json, "AA:BB:CC:DD:EE:FF").as_deref(),
            Some("b-up")
        );
        assert_eq!(fdb_port_of(json, "00:00:00:00:00:01"), None);
        assert_eq!(fdb_port_of("not json", "00:00:00:00:00:01"), None);
    }
}
