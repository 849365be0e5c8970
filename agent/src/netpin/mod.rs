//! eBPF on the host's NICs: keep migration traffic on the migration NIC and measure how the
//! links are used.
//!
//! The programs (`ebpf/netpin.bpf.c`, built into `ebpf/netpin.bpf.o` by `cargo xtask
//! build-ebpf` and embedded here) are loaded with aya and attached with TCX, ingress and egress,
//! to every interface of the host but `lo`. TCX links belong to this process: they go away when
//! the agent exits, even by SIGKILL, so a restart never finds a second set attached.
//!
//! - **Pinning.** Every migration socket carries [`MIGRATION_MARK`] (SO_MARK). A marked packet
//!   about to leave through another NIC (say a route prefers the management link) is redirected
//!   to the migration NIC with `bpf_redirect_neigh`; with pinning off it is counted as a leak
//!   and left alone. With `dedicated`, unmarked IPv4 traffic is kept off the migration NIC
//!   (dropped, counted).
//! - **Utilization.** Per-CPU counters per interface, direction and class (migration / other)
//!   are sampled every 100 ms into bits per second and percent of the link speed (from the NIC,
//!   or `[migration] link_speed`, which wins for the migration NIC: veth, for one, reports a
//!   nominal 10 Gbit/s that means nothing).
//!
//! Where BPF is not available the agent runs without it and says so once; `ferry stats` then
//! reports pinning and utilization as unavailable with the reason.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, PerCpuHashMap, PerCpuValues};
use aya::programs::{tc::TcAttachType, SchedClassifier};
use aya::Ebpf;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The BPF object, built from `ebpf/netpin.bpf.c`.
pub static OBJECT: &[u8] = include_bytes!("../../../ebpf/netpin.bpf.o");

/// SO_MARK of every migration socket ("FRRY").
pub const MIGRATION_MARK: u32 = 0x4652_5259;
/// How often counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How much history is kept (for migration summaries).
const HISTORY: usize = 6000;

const FLAG_PIN: u32 = 1;
const FLAG_DEDICATED: u32 = 2;
const EV_REDIRECTED: u32 = 0;
const EV_LEAKED: u32 = 1;
const EV_DEDICATED_DROP: u32 = 2;

/// Errors setting up the eBPF programs.
#[derive(Debug, thiserror::Error)]
pub enum NetpinError {
    #[error("loading the BPF programs failed: {0}")]
    Load(String),
    #[error("attaching to {iface} failed: {why}")]
    Attach { iface: String, why: String },
    #[error(
        "the migration interface {0:?} does not exist on this host; check [migration] interface"
    )]
    NoInterface(String),
    #[error("BPF maps: {0}")]
    Map(String),
}

// The keys and values of the three BPF maps, mirrors of the structs in ebpf/netpin.bpf.c.
// The zerocopy derives prove at compile time that each has no padding (IntoBytes) and that
// every bit pattern is a valid value (FromBytes); the const block below checks size, alignment
// and every field's offset against the C definitions; the test
// `map_structs_match_the_c_source` reads the C source and compares field names, offsets and
// sizes.

/// `struct config` (FERRY_CONFIG, an array of one).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, IntoBytes, FromBytes, Immutable)]
struct Config {
    migration_ifindex: u32,
    mark: u32,
    /// Network byte order.
    migration_addr: u32,
    flags: u32,
}

/// `struct counter_key` (FERRY_COUNTERS' key).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, IntoBytes, FromBytes, Immutable)]
struct CounterKey {
    ifindex: u32,
    dir: u8,
    class: u8,
    pad: u16,
}

/// `struct counter` (FERRY_COUNTERS' and FERRY_EVENTS' value).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, IntoBytes, FromBytes, Immutable)]
struct Counter {
    bytes: u64,
    packets: u64,
}

// The C layouts (each field at its natural alignment, as clang lays them out for BPF).
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    // struct config { __u32 migration_ifindex; __u32 mark; __u32 migration_addr; __u32 flags; }
    assert!(size_of::<Config>() == 16 && align_of::<Config>() == 4);
    assert!(offset_of!(Config, migration_ifindex) == 0);
    assert!(offset_of!(Config, mark) == 4);
    assert!(offset_of!(Config, migration_addr) == 8);
    assert!(offset_of!(Config, flags) == 12);
    // struct counter_key { __u32 ifindex; __u8 dir; __u8 class; __u16 pad; }
    assert!(size_of::<CounterKey>() == 8 && align_of::<CounterKey>() == 4);
    assert!(offset_of!(CounterKey, ifindex) == 0);
    assert!(offset_of!(CounterKey, dir) == 4);
    assert!(offset_of!(CounterKey, class) == 5);
    assert!(offset_of!(CounterKey, pad) == 6);
    // struct counter { __u64 bytes; __u64 packets; }
    assert!(size_of::<Counter>() == 16 && align_of::<Counter>() == 8);
    assert!(offset_of!(Counter, bytes) == 0);
    assert!(offset_of!(Counter, packets) == 8);
};

// aya's map API takes `Pod` values, an unsafe marker trait with no bridge from zerocopy's
// traits, so the impls stay; the derives above carry the proof they need.
// SAFETY: `Config` is #[repr(C)] with no padding (IntoBytes) and valid for every bit pattern
// (FromBytes), so copying it to and from the kernel's map bytes is sound; its layout is the C
// struct's (the const block above).
unsafe impl aya::Pod for Config {}
// SAFETY: as for `Config`; the explicit `pad` field fills the struct to 8 bytes.
unsafe impl aya::Pod for CounterKey {}
// SAFETY: as for `Config`.
unsafe impl aya::Pod for Counter {}

/// What netpin needs from the configuration.
#[derive(Debug, Clone)]
pub struct NetpinConfig {
    pub migration_interface: String,
    pub migration_addr: Option<Ipv4Addr>,
    pub pin: bool,
    pub dedicated: bool,
    /// Link speed to assume where the NIC does not report one, bits per second.
    pub link_speed_bps: Option<u64>,
}

/// Bytes and packets of one direction and class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub bytes: u64,
    pub packets: u64,
    /// Over the last second.
    pub bits_per_s: f64,
    /// Of the link speed, when known.
    pub percent: Option<f64>,
}

/// One direction of an interface.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Direction {
    pub migration: Flow,
    pub other: Flow,
}

/// One interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub name: String,
    pub ifindex: u32,
    /// The migration NIC.
    pub migration: bool,
    /// Link speed in bits per second, and where it came from ("nic" or "config").
    pub speed_bps: Option<u64>,
    pub speed_source: Option<String>,
    pub tx: Direction,
    pub rx: Direction,
}

/// Pinning counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pinning {
    pub enabled: bool,
    pub dedicated: bool,
    pub mark: u32,
    pub redirected_packets: u64,
    pub redirected_bytes: u64,
    pub leaked_packets: u64,
    pub leaked_bytes: u64,
    pub dedicated_dropped_packets: u64,
    pub dedicated_dropped_bytes: u64,
}

/// What `ferry stats` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub available: bool,
    /// Why not, when unavailable.
    pub reason: Option<String>,
    pub sample_ms: u64,
    pub interfaces: Vec<InterfaceStats>,
    pub pinning: Pinning,
    /// What the kernel has attached (TCX), per interface and hook: program names. Ferry's are
    /// `ferry_egress` and `ferry_ingress`, exactly once each.
    pub attached: Vec<Attachment>,
}

/// Programs attached to one hook of one interface, as the kernel reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub hook: String,
    pub programs: Vec<String>,
}

/// Ask the kernel which TCX programs are attached to `iface`.
pub fn attached(iface: &str) -> Vec<Attachment> {
    [
        ("egress", TcAttachType::Egress),
        ("ingress", TcAttachType::Ingress),
    ]
    .into_iter()
    .map(|(hook, t)| Attachment {
        interface: iface.to_string(),
        hook: hook.into(),
        programs: SchedClassifier::query_tcx(iface, t)
            .map(|(_, progs)| {
                progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default(),
    })
    .collect()
}

/// Utilization of the migration NIC over a time span (sending side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkUtilization {
    pub interface_speed_bps: Option<u64>,
    pub avg_bits_per_s: f64,
    pub peak_bits_per_s: f64,
    pub avg_percent: Option<f64>,
    pub peak_percent: Option<f64>,
}

struct Iface {
    name: String,
    ifindex: u32,
    speed_bps: Option<u64>,
    speed_source: Option<&'static str>,
}

#[derive(Clone)]
struct Sample {
    at: Instant,
    /// Per interface: [rx other, rx migration, tx other, tx migration] as (bytes, packets).
    values: Vec<[(u64, u64); 4]>,
    events: [(u64, u64); 3],
}

struct Maps {
    counters: PerCpuHashMap<MapData, CounterKey, Counter>,
    events: aya::maps::PerCpuArray<MapData, Counter>,
}

/// The loaded programs and their counters.
pub struct NetPin {
    cfg: NetpinConfig,
    ifaces: Vec<Iface>,
    migration_index: usize,
    maps: Mutex<Maps>,
    history: Mutex<VecDeque<Sample>>,
    // Dropping the Ebpf object detaches every TCX link.
    _bpf: Mutex<Ebpf>,
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn nic_speed(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/speed"))
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|m| *m > 0)
        .map(|mbit| mbit as u64 * 1_000_000)
}

/// Interfaces of this host worth watching: every one but loopback.
fn host_interfaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Why the eBPF programs are not running on this host (`ferry stats` says it).
#[derive(Debug, thiserror::Error)]
pub enum NetpinOff {
    #[error("no [migration] section in the configuration")]
    NoMigration,
    #[error("disabled by [migration] ebpf = false")]
    Disabled,
    #[error("no [migration] interface configured")]
    NoInterface,
    #[error("eBPF is unavailable here ({0}): migration traffic is not pinned to the migration NIC and link utilization is not measured")]
    Unavailable(NetpinError),
}

/// A link speed that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a link speed; write e.g. 10gbit, 25G or 1000mbit")]
pub struct BadSpeed(pub String);

/// Parse "10gbit", "25G", "1000mbit", "100m" into bits per second.
pub fn parse_speed(s: &str) -> Result<u64, BadSpeed> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("bit")
        .or_else(|| t.strip_suffix("bps"))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('g') => (&t[..t.len() - 1], 1_000_000_000f64),
        Some('m') => (&t[..t.len() - 1], 1_000_000f64),
        Some('k') => (&t[..t.len() - 1], 1_000f64),
        _ => (t, 1f64),
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .map(|v| (v * mult) as u64)
        .ok_or_else(|| BadSpeed(s.to_string()))
}

impl NetPin {
    /// Load the programs, configure them and attach them to every interface but `lo`.
    pub fn start(cfg: NetpinConfig) -> Result<Arc<NetPin>, NetpinError> {
        let mig_index = ifindex(&cfg.migration_interface)
            .ok_or_else(|| NetpinError::NoInterface(cfg.migration_interface.clone()))?;
        let mut bpf = Ebpf::load(OBJECT).map_err(|e| NetpinError::Load(e.to_string()))?;
        {
            let mut conf: Array<&mut MapData, Config> = Array::try_from(
                bpf.map_mut("FERRY_CONFIG")
                    .ok_or_else(|| NetpinError::Map("FERRY_CONFIG missing".into()))?,
            )
            .map_err(|e| NetpinError::Map(e.to_string()))?;
            let flags =
                if cfg.pin { FLAG_PIN } else { 0 } | if cfg.dedicated { FLAG_DEDICATED } else { 0 };
            conf.set(
                0,
                Config {
                    migration_ifindex: mig_index,
                    mark: MIGRATION_MARK,
                    migration_addr: cfg
                        .migration_addr
                        .map_or(0, |a| u32::from_ne_bytes(a.octets())),
                    flags,
                },
                0,
            )
            .map_err(|e| NetpinError::Map(e.to_string()))?;
        }
        let mut ifaces = Vec::new();
        for name in host_interfaces() {
            let Some(ix) = ifindex(&name) else { continue };
            // The configured speed wins for the migration NIC (veth reports a nominal 10G).
            let (speed_bps, speed_source) = match (ix == mig_index, cfg.link_speed_bps) {
                (true, Some(s)) => (Some(s), Some("config")),
                _ => match nic_speed(&name) {
                    Some(s) => (Some(s), Some("nic")),
                    None => (None, None),
                },
            };
            ifaces.push(Iface {
                name,
                ifindex: ix,
                speed_bps,
                speed_source,
            });
        }
        let migration_index = ifaces
            .iter()
            .position(|i| i.ifindex == mig_index)
            .ok_or_else(|| NetpinError::NoInterface(cfg.migration_interface.clone()))?;
        // Counter keys first, so no packet is missed once attached.
        let nr_cpus =
            aya::util::nr_cpus().map_err(|(w, e)| NetpinError::Map(format!("{w}: {e}")))?;
        let mut counters: PerCpuHashMap<MapData, CounterKey, Counter> = PerCpuHashMap::try_from(
            bpf.take_map("FERRY_COUNTERS")
                .ok_or_else(|| NetpinError::Map("FERRY_COUNTERS missing".into()))?,
        )
        .map_err(|e| NetpinError::Map(e.to_string()))?;
        for i in &ifaces {
            for dir in 0..2u8 {
                for class in 0..2u8 {
                    let zeros = PerCpuValues::try_from(vec![Counter::default(); nr_cpus])
                        .map_err(|e| NetpinError::Map(e.to_string()))?;
                    counters
                        .insert(
                            CounterKey {
                                ifindex: i.ifindex,
                                dir,
                                class,
                                pad: 0,
                            },
                            zeros,
                            0,
                        )
                        .map_err(|e| NetpinError::Map(e.to_string()))?;
                }
            }
        }
        let events: aya::maps::PerCpuArray<MapData, Counter> = aya::maps::PerCpuArray::try_from(
            bpf.take_map("FERRY_EVENTS")
                .ok_or_else(|| NetpinError::Map("FERRY_EVENTS missing".into()))?,
        )
        .map_err(|e| NetpinError::Map(e.to_string()))?;
        for (prog, dir) in [
            ("ferry_egress", TcAttachType::Egress),
            ("ferry_ingress", TcAttachType::Ingress),
        ] {
            let p: &mut SchedClassifier = bpf
                .program_mut(prog)
                .ok_or_else(|| NetpinError::Load(format!("program {prog} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| NetpinError::Load(e.to_string()))?;
            p.load().map_err(|e| NetpinError::Load(e.to_string()))?;
            for i in &ifaces {
                p.attach(&i.name, dir).map_err(|e| NetpinError::Attach {
                    iface: i.name.clone(),
                    why: e.to_string(),
                })?;
            }
        }
        tracing::info!(
            migration_interface = %cfg.migration_interface,
            interfaces = ifaces.len(),
            pin = cfg.pin,
            dedicated = cfg.dedicated,
            "eBPF programs attached (TCX)"
        );
        let np = Arc::new(NetPin {
            cfg,
            ifaces,
            migration_index,
            maps: Mutex::new(Maps { counters, events }),
            history: Mutex::new(VecDeque::new()),
            _bpf: Mutex::new(bpf),
        });
        let weak = Arc::downgrade(&np);
        let spawned = std::thread::Builder::new()
            .name("netpin-sampler".into())
            .spawn(move || loop {
                std::thread::sleep(SAMPLE_EVERY);
                let Some(np) = weak.upgrade() else { return };
                np.sample();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the link sampler; rates will be missing");
        }
        np.sample();
        Ok(np)
    }

    fn read(&self) -> Option<Sample> {
        let maps = self.maps.lock().ok()?;
        let mut values = Vec::with_capacity(self.ifaces.len());
        for i in &self.ifaces {
            let mut v = [(0u64, 0u64); 4];
            for (slot, (dir, class)) in [(0u8, 0u8), (0, 1), (1, 0), (1, 1)].iter().enumerate() {
                let key = CounterKey {
                    ifindex: i.ifindex,
                    dir: *dir,
                    class: *class,
                    pad: 0,
                };
                if let Ok(per_cpu) = maps.counters.get(&key, 0) {
                    for c in per_cpu.iter() {
                        v[slot].0 += c.bytes;
                        v[slot].1 += c.packets;
                    }
                }
            }
            values.push(v);
        }
        let mut events = [(0u64, 0u64); 3];
        for (k, e) in [EV_REDIRECTED, EV_LEAKED, EV_DEDICATED_DROP]
            .iter()
            .enumerate()
        {
            if let Ok(per_cpu) = maps.events.get(e, 0) {
                for c in per_cpu.iter() {
                    events[k].0 += c.bytes;
                    events[k].1 += c.packets;
                }
            }
        }
        Some(Sample {
            at: Instant::now(),
            values,
            events,
        })
    }

    fn sample(&self) {
        let Some(s) = self.read() else { return };
        if let Ok(mut h) = self.history.lock() {
            h.push_back(s);
            while h.len() > HISTORY {
                h.pop_front();
            }
        }
    }

    /// Current counters, with rates over the last second.
    pub fn report(&self) -> StatsReport {
        let (now, then) = match self.history.lock() {
            Ok(h) => {
                let now = h.back().cloned();
                let then = now.as_ref().and_then(|n| {
                    h.iter()
                        .rev()
                        .find(|s| n.at.duration_since(s.at) >= Duration::from_millis(900))
                        .cloned()
                        .or_else(|| h.front().cloned())
                });
                (now, then)
            }
            Err(_) => (None, None),
        };
        let Some(now) = now else {
            return StatsReport::default();
        };
        let then = then.unwrap_or_else(|| now.clone());
        let dt = now.at.duration_since(then.at).as_secs_f64();
        let mut interfaces = Vec::new();
        for (k, i) in self.ifaces.iter().enumerate() {
            let flow = |slot: usize| {
                let (b, p) = now.values[k][slot];
                let b0 = then.values.get(k).map_or(b, |v| v[slot].0);
                let bits = if dt > 0.0 {
                    b.saturating_sub(b0) as f64 * 8.0 / dt
                } else {
                    0.0
                };
                Flow {
                    bytes: b,
                    packets: p,
                    bits_per_s: bits,
                    percent: i.speed_bps.map(|s| 100.0 * bits / s as f64),
                }
            };
            interfaces.push(InterfaceStats {
                name: i.name.clone(),
                ifindex: i.ifindex,
                migration: k == self.migration_index,
                speed_bps: i.speed_bps,
                speed_source: i.speed_source.map(str::to_string),
                rx: Direction {
                    other: flow(0),
                    migration: flow(1),
                },
                tx: Direction {
                    other: flow(2),
                    migration: flow(3),
                },
            });
        }
        StatsReport {
            available: true,
            reason: None,
            sample_ms: SAMPLE_EVERY.as_millis() as u64,
            interfaces,
            pinning: Pinning {
                enabled: self.cfg.pin,
                dedicated: self.cfg.dedicated,
                mark: MIGRATION_MARK,
                redirected_bytes: now.events[0].0,
                redirected_packets: now.events[0].1,
                leaked_bytes: now.events[1].0,
                leaked_packets: now.events[1].1,
                dedicated_dropped_bytes: now.events[2].0,
                dedicated_dropped_packets: now.events[2].1,
            },
            attached: self.ifaces.iter().flat_map(|i| attached(&i.name)).collect(),
        }
    }

    /// Migration traffic sent on the migration NIC between two instants: average and the peak
    /// of the 100 ms samples. The window is widened by one sample on each side, so a copy shorter
    /// than two sampling periods still has a first and a last sample around it (its average then
    /// includes up to a period of idle link on each side).
    pub fn migration_tx_between(&self, from: Instant, to: Instant) -> Option<LinkUtilization> {
        let h = self.history.lock().ok()?;
        let start = from.checked_sub(SAMPLE_EVERY).unwrap_or(from);
        let pts: Vec<(Instant, u64)> = h
            .iter()
            .filter(|s| s.at >= start && s.at <= to + SAMPLE_EVERY)
            .map(|s| (s.at, s.values[self.migration_index][3].0))
            .collect();
        if pts.len() < 2 {
            return None;
        }
        let (t0, b0) = pts[0];
        let (t1, b1) = pts[pts.len() - 1];
        let secs = t1.duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let avg = b1.saturating_sub(b0) as f64 * 8.0 / secs;
        let peak = pts
            .windows(2)
            .map(|w| {
                let dt = w[1].0.duration_since(w[0].0).as_secs_f64();
                if dt > 0.0 {
                    w[1].1.saturating_sub(w[0].1) as f64 * 8.0 / dt
                } else {
                    0.0
                }
            })
            .fold(0.0, f64::max);
        let speed = self.ifaces[self.migration_index].speed_bps;
        Some(LinkUtilization {
            interface_speed_bps: speed,
            avg_bits_per_s: avg,
            peak_bits_per_s: peak,
            avg_percent: speed.map(|s| 100.0 * avg / s as f64),
            peak_percent: speed.map(|s| 100.0 * peak / s as f64),
        })
    }

    /// The migration NIC's current migration send rate in percent of its speed.
    pub fn migration_tx_percent(&self) -> Option<f64> {
        let r = self.report();
        r.interfaces
            .iter()
            .find(|i| i.migration)
            .and_then(|i| i.tx.migration.percent)
    }
}

/// Put [`MIGRATION_MARK`] on a socket (its packets are then pinned and counted as migration).
pub fn mark_socket(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let mark: libc::c_int = MIGRATION_MARK as libc::c_int;
    // SAFETY: setsockopt with a pointer to an int we own and its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;
