//! The agent's configuration file (`/etc/ferry/agent.toml` by default).
//!
//! ```toml
//! [agent]
//! name = "a"                              # this host's name among its peers (default: hostname)
//! socket = "/run/ferry/agent.sock"        # local API (mode 0660, root only)
//! state_dir = "/var/lib/ferry"
//!
//! [limits]
//! memory_reserve_mib = 1024               # host memory never promised to guests
//! huge_pages = true                       # guest memory on transparent huge pages
//!
//! [management]                            # control traffic between agents
//! address = "198.18.0.1"
//! port = 7720
//!
//! [migration]                             # the dedicated migration NIC
//! interface = "mig0"
//! address = "198.18.1.1"
//! enabled = true
//! ebpf = true                             # load the eBPF programs (pinning, utilization)
//! pin = true                              # keep migration traffic on `interface`
//! dedicated = false                       # keep other IPv4 traffic off `interface`
//! link_speed = "10gbit"                   # where the NIC does not report its speed (veth)
//! encrypt = "preferred"                   # "required" | "preferred" (default) | "off": AES-256-GCM
//!                                         # page streams and state, keyed from [cluster] key_file
//!
//! [vmm]
//! mode = "inline"                         # "inline" (default): guests run in the agent process;
//!                                         # "process": one `ferry vmm` process per guest, which
//!                                         # outlives agent restarts (docs/vmm.md)
//!
//! [datastores]                            # name -> directory
//! shared = "/srv/ferry/shared"
//! local = "/srv/ferry/local"
//!
//! [port_groups]                           # name -> bridge or interface
//! vm-net = "vmbr0"
//!
//! [peers]                                 # name -> management address
//! b = "198.18.0.2"
//!
//! [cpu]
//! mask = ["avx512f"]                      # features this host does not offer its guests
//!
//! [cluster]
//! key_file = "/etc/ferry/cluster.key"     # shared secret of the cluster (>= 32 bytes, 0600)
//! ownership_datastore = "shared"          # where guest ownership records live (the commit point)
//! lock_lease_s = 30                       # disk locks of a host silent this long are stale
//!
//! [metrics]
//! address = "198.18.0.1:9720"             # Prometheus text at GET /metrics (absent: off)
//!
//! [debug]
//! faults = false                          # accept fault injection (POST /v1/debug/faults); tests only
//! ```
//!
//! Unknown keys are refused (a typo must not silently fall back to a default), and every error
//! names the file, line and column.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the agent looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/ferry/agent.toml";
pub const DEFAULT_SOCKET: &str = "/run/ferry/agent.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";
pub const DEFAULT_MANAGEMENT_PORT: u16 = 7720;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            name: default_name(),
            socket: default_socket(),
            state_dir: default_state_dir(),
        }
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Host memory (MiB) that is never promised to guests.
    #[serde(default = "default_reserve")]
    pub memory_reserve_mib: u64,
    /// Back guest memory with transparent huge pages (faster to fill and to receive; a guest
    /// that touches one byte of a 2 MiB range costs 2 MiB).
    #[serde(default = "yes")]
    pub huge_pages: bool,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            memory_reserve_mib: default_reserve(),
            huge_pages: true,
        }
    }
}

fn default_reserve() -> u64 {
    512
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementSection {
    pub address: IpAddr,
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_port() -> u16 {
    DEFAULT_MANAGEMENT_PORT
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSection {
    /// The dedicated migration NIC (eBPF pinning and utilization work on it).
    #[serde(default)]
    pub interface: Option<String>,
    /// This host's address on the migration network.
    pub address: IpAddr,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Load the eBPF programs on this host's NICs (needs `interface`).
    #[serde(default = "yes")]
    pub ebpf: bool,
    /// Redirect migration traffic that would leave through another NIC to the migration NIC.
    #[serde(default = "yes")]
    pub pin: bool,
    /// Keep every other IPv4 traffic off the migration NIC (dropped and counted).
    #[serde(default)]
    pub dedicated: bool,
    /// The migration link's speed where the NIC cannot tell (veth), e.g. "10gbit".
    #[serde(default)]
    pub link_speed: Option<String>,
    /// Encryption of migrations (AES-256-GCM, key derived from the cluster key).
    #[serde(default)]
    pub encrypt: EncryptPolicy,
}

/// `[migration] encrypt`: whether migrations are encrypted.
///
/// - `preferred` (default): every migration is encrypted when both peers can, i.e. when the
///   cluster key is configured (an authenticated peer holds it too); plain otherwise.
/// - `required`: outgoing migrations are always encrypted and incoming plain ones are refused;
///   needs `[cluster] key_file`.
/// - `off`: outgoing migrations are plain unless `ferry migrate --encrypt`; incoming encrypted
///   ones are still accepted.
///
/// The booleans of earlier versions still parse: `true` = `required`, `false` = `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncryptPolicy {
    Required,
    #[default]
    Preferred,
    Off,
}

impl<'de> Deserialize<'de> for EncryptPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(EncryptPolicy::Required),
            Raw::Bool(false) => Ok(EncryptPolicy::Off),
            Raw::Text(t) => match t.as_str() {
                "required" => Ok(EncryptPolicy::Required),
                "preferred" => Ok(EncryptPolicy::Preferred),
                "off" => Ok(EncryptPolicy::Off),
                other => Err(serde::de::Error::custom(format!(
                    "encrypt = {other:?}: give \"required\", \"preferred\" or \"off\""
                ))),
            },
        }
    }
}

fn yes() -> bool {
    true
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub management: Option<ManagementSection>,
    #[serde(default)]
    pub migration: Option<MigrationSection>,
    #[serde(default)]
    pub datastores: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub port_groups: BTreeMap<String, String>,
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    #[serde(default)]
    pub cpu: CpuSection,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub debug: DebugSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Left out of a written config while it is the default, so that a config written by this
    /// build (the lab's) still loads into an agent from before `[vmm]` existed (benchmarks
    /// compare such builds side by side).
    #[serde(default, skip_serializing_if = "VmmSection::is_default")]
    pub vmm: VmmSection,
}

/// `[vmm]`: where guests run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VmmSection {
    /// "inline" (default): every guest runs inside the agent process, and stops with it.
    /// "process": every guest runs in a `ferry vmm` process of its own (docs/vmm.md), which
    /// outlives the agent: a restarted agent adopts it.
    #[serde(default)]
    pub mode: VmmMode,
}

impl VmmSection {
    /// Whether this is what an absent `[vmm]` means.
    pub fn is_default(&self) -> bool {
        *self == VmmSection::default()
    }
}

/// `[vmm] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmmMode {
    #[default]
    Inline,
    Process,
}

/// `[cluster]`: how agents trust each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The cluster key (a file of at least 32 bytes, mode 0600) every agent of the cluster
    /// holds: peers prove it to each other before anything is accepted. Without it peers are
    /// not authenticated (a warning at start).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The datastore (a name from `[datastores]`, shared by every host) that holds the guests'
    /// ownership records, the commit point of migrations. Without it the commit point is the
    /// `Commit` frame alone, and a source that hears nothing after it can only ask the peer.
    #[serde(default)]
    pub ownership_datastore: Option<String>,
    /// Seconds without a heartbeat after which a host's disk locks are reported stale (it
    /// renews them every third of this). Default 30, like VMFS's lease.
    #[serde(default = "default_lock_lease")]
    pub lock_lease_s: u64,
}

fn default_lock_lease() -> u64 {
    30
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            key_file: None,
            ownership_datastore: None,
            lock_lease_s: default_lock_lease(),
        }
    }
}

/// `[metrics]`: the opt-in Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Serve `GET /metrics` (Prometheus text) on this address and port, e.g. the management
    /// address: "198.18.0.1:9720". Absent: no endpoint.
    #[serde(default)]
    pub address: Option<std::net::SocketAddr>,
}

/// `[debug]`: switches for tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DebugSection {
    /// Accept fault injection through the API (`POST /v1/debug/faults`). Never in production.
    #[serde(default)]
    pub faults: bool,
}

/// `[cpu]`: what this host offers guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CpuSection {
    /// CPU features this host does not offer its guests (and so will not accept in a
    /// migration): names like avx512f or leaf:subleaf:reg:bit. A cluster-wide baseline.
    #[serde(default)]
    pub mask: Vec<String>,
}

/// 1-based line and column of byte offset `pos` in `text`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = &text[..pos.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl Config {
    /// Parse configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Load from a file. With `explicit == false` a missing file means "all defaults".
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if !valid_name(&self.agent.name) {
            return Err(bad(format!(
                "[agent] name {:?} is not a valid host name (letters, digits, '.', '_', '-'; at most 64)",
                self.agent.name
            )));
        }
        if self.agent.socket.as_os_str().is_empty() {
            return Err(bad("[agent] socket must not be empty".into()));
        }
        for (name, dir) in &self.datastores {
            if !valid_name(name) {
                return Err(bad(format!("[datastores] {name:?} is not a valid name")));
            }
            if !dir.is_absolute() {
                return Err(bad(format!(
                    "[datastores] {name} = {:?} must be an absolute path",
                    dir.display()
                )));
            }
        }
        if self
            .migration
            .as_ref()
            .is_some_and(|m| m.encrypt == EncryptPolicy::Required)
            && self.cluster.key_file.is_none()
        {
            return Err(bad(
                "[migration] encrypt = \"required\" needs [cluster] key_file: the data key is derived from the cluster key".into(),
            ));
        }
        if !(2..=3600).contains(&self.cluster.lock_lease_s) {
            return Err(bad(format!(
                "[cluster] lock_lease_s = {} is out of range: give 2 to 3600 seconds (default 30)",
                self.cluster.lock_lease_s
            )));
        }
        if let Some(ds) = &self.cluster.ownership_datastore {
            if !self.datastores.contains_key(ds) {
                return Err(bad(format!(
                    "[cluster] ownership_datastore = {ds:?} is not one of [datastores] ({})",
                    self.datastores
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        for f in &self.cpu.mask {
            crate::vm::cpuid::parse_feature(f).map_err(|e| bad(format!("[cpu] mask: {e}")))?;
        }
        if let Some(m) = &self.migration {
            if let Some(sp) = &m.link_speed {
                crate::netpin::parse_speed(sp)
                    .map_err(|e| bad(format!("[migration] link_speed: {e}")))?;
            }
            if m.dedicated && m.interface.is_none() {
                return Err(bad(
                    "[migration] dedicated = true needs [migration] interface".into(),
                ));
            }
        }
        for (name, iface) in &self.port_groups {
            if !valid_name(name) || iface.is_empty() || iface.len() > 15 {
                return Err(bad(format!(
                    "[port_groups] {name} = {iface:?}: needs a name and an interface name of at most 15 characters"
                )));
            }
        }
        Ok(())
    }
}

/// Names of VMs, hosts, datastores: 1-64 of `[A-Za-z0-9._-]`, not starting with '.' or '-'.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_policy_parses_words_and_old_booleans() {
        let p = |v: &str| {
            Config::parse(
                &format!("[cluster]\nkey_file = \"/k\"\n[migration]\naddress = \"198.18.1.1\"\nencrypt = {v}\n"),
                Path::new("t.toml"),
            )
            .map(|c| c.migration.unwrap().encrypt)
        };
        assert_eq!(p("\"required\"").unwrap(), EncryptPolicy::Required);
        assert_eq!(p("\"preferred\"").unwrap(), EncryptPolicy::Preferred);
        assert_eq!(p("\"off\"").unwrap(), EncryptPolicy::Off);
        assert_eq!(p("true").unwrap(), EncryptPolicy::Required);
        assert_eq!(p("false").unwrap(), EncryptPolicy::Off);
        let e = p("\"maybe\"").unwrap_err().to_string();
        assert!(e.contains("required") && e.contains("preferred"), "{e}");
        let c = Config::parse(
            "[migration]\naddress = \"198.18.1.1\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.migration.unwrap().encrypt, EncryptPolicy::Preferred);
        let e = Config::parse(
            "[migration]\naddress = \"198.18.1.1\"\nencrypt = \"required\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key_file"), "{e}");
    }

    #[test]
    fn full_example_parses() {
        let text = r#"
[agent]
name = "a"
socket = "/tmp/a.sock"
state_dir = "/tmp/a"

[limits]
memory_reserve_mib = 1024

[management]
address = "198.18.0.1"

[migration]
interface = "mig0"
address = "198.18.1.1"

[datastores]
shared = "/srv/shared"

[port_groups]
vm-net = "vmbr0"

[peers]
b = "198.18.0.2"
"#;
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.agent.name, "a");
        assert_eq!(c.management.unwrap().port, DEFAULT_MANAGEMENT_PORT);
        assert!(c.migration.unwrap().enabled);
        assert_eq!(c.limits.memory_reserve_mib, 1024);
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = Config::parse(
            "[agent]\nname = \"a\"\nsokcet = \"/x\"\n",
            Path::new("a.toml"),
        )
        .unwrap_err();
        let ConfigError::Parse { line, column, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!((*line, *column), (3, 1));
        assert!(
            e.to_string()
                .starts_with("a.toml:3:1: unknown field `sokcet`"),
            "{e}"
        );

        let e = Config::parse("[agent\nname = 1", Path::new("b.toml")).unwrap_err();
        assert!(e.to_string().starts_with("b.toml:1:"), "{e}");

        let e = Config::parse(
            "[management]\naddress = \"not-an-ip\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("c.toml:2:"), "{e}");
    }

    #[test]
    fn semantic_errors_are_explained() {
        let e = Config::parse(
            "[datastores]\nshared = \"relative/dir\"\n",
            Path::new("d.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("absolute path"), "{e}");
        let e = Config::parse("[agent]\nname = \"bad name\"\n", Path::new("e.toml")).unwrap_err();
        assert!(e.to_string().contains("not a valid host name"), "{e}");
    }

    #[test]
    fn missing_default_file_means_defaults() {
        let c = Config::load(Path::new("/nonexistent/ferry.toml"), false).unwrap();
        assert_eq!(c.agent.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(Config::load(Path::new("/nonexistent/ferry.toml"), true).is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("vm-1.test_2"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}
