//! Each lab agent's `agent.toml` and the cluster key the agents share.
//!
//! A config is the agent's own [`Config`] value, serialized with `toml`: no TOML is written by
//! hand, and a change to the agent's schema breaks the xtask build rather than the lab at run
//! time. Every setting is spelled out, defaults included, so the file shows what the agent runs
//! with. Tests change a lab agent's settings with [`Lab::edit_config`], which goes through the
//! same types.

use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ferry::control::config::{
    AgentSection, ClusterSection, Config, CpuSection, DebugSection, EncryptPolicy, LimitsSection,
    ManagementSection, MetricsSection, MigrationSection, VmmMode, VmmSection,
    DEFAULT_MANAGEMENT_PORT,
};

use super::lifecycle::{local_datastore, shared_datastore};
use super::{Lab, LabHost, LAB_LINK_SPEED, METRICS_PORT, MIGRATION_IFACE, PORT_GROUP, VM_BRIDGE};

/// The datastore both hosts share (and that holds the ownership records) and each host's own.
const SHARED_DATASTORE: &str = "shared";
const LOCAL_DATASTORE: &str = "local";

/// The first lines of every lab agent's `agent.toml`.
const HEADER: &str =
    "# A lab agent's config, written by `cargo xtask lab` (xtask/src/lab/config.rs) from the\n\
                      # agent's own Config type. The lab is a test bench: [debug] faults = true\n\
                      # accepts fault injection.\n\n";

impl Lab {
    /// The cluster key both lab agents share (created once per lab, mode 0600).
    pub fn cluster_key(&self) -> PathBuf {
        self.root.join("cluster.key")
    }

    /// The configuration `up` gives host `host`'s agent, or `None` if there is no such host.
    pub fn agent_config(&self, host: &str) -> Option<Config> {
        let h = self.host(host)?;
        Some(agent_config(
            h,
            &self.root,
            &self.hosts,
            &self.cluster_key(),
        ))
    }

    /// Changes host `host`'s `agent.toml`: reads and checks it as the agent would, lets `edit`
    /// change the [`Config`] and writes it back. The agent sees the change when it is restarted
    /// ([`Lab::stop_agent`], [`Lab::start_agent`]).
    pub fn edit_config(&self, host: &str, edit: impl FnOnce(&mut Config)) -> Result<()> {
        let h = &self.hosts[self.index_of(host)?];
        let mut config = Config::load(&h.config, true)
            .with_context(|| format!("cannot read the agent config of host {host}"))?;
        edit(&mut config);
        write_config(&h.config, &config)
    }

    pub(super) fn write_configs(&self) -> Result<()> {
        let key = self.cluster_key();
        if !key.exists() {
            let mut bytes = [0u8; 32];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .context("cannot read /dev/urandom for the lab's cluster key")?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key)
                .with_context(|| format!("cannot create {}", key.display()))?;
            f.write_all(hex.as_bytes())?;
        }
        for h in &self.hosts {
            write_config(&h.config, &agent_config(h, &self.root, &self.hosts, &key))?;
        }
        Ok(())
    }
}

/// The configuration of `host`'s agent in the lab at `root` with hosts `hosts` (its peers are
/// the others) and cluster key file `key`.
fn agent_config(host: &LabHost, root: &Path, hosts: &[LabHost], key: &Path) -> Config {
    Config {
        agent: AgentSection {
            name: host.name.clone(),
            socket: host.socket.clone(),
            state_dir: host.state_dir.clone(),
        },
        limits: LimitsSection::default(),
        management: Some(ManagementSection {
            address: host.mgmt_addr.into(),
            port: DEFAULT_MANAGEMENT_PORT,
        }),
        migration: Some(MigrationSection {
            interface: Some(MIGRATION_IFACE.to_owned()),
            address: host.migration_addr.into(),
            enabled: true,
            ebpf: true,
            pin: true,
            dedicated: false,
            link_speed: Some(LAB_LINK_SPEED.to_owned()),
            encrypt: EncryptPolicy::default(),
        }),
        datastores: [
            (SHARED_DATASTORE.to_owned(), shared_datastore(root)),
            (
                LOCAL_DATASTORE.to_owned(),
                local_datastore(root, &host.name),
            ),
        ]
        .into(),
        port_groups: [(PORT_GROUP.to_owned(), VM_BRIDGE.to_owned())].into(),
        peers: hosts
            .iter()
            .filter(|p| p.name != host.name)
            .map(|p| (p.name.clone(), p.mgmt_addr.to_string()))
            .collect(),
        cpu: CpuSection::default(),
        cluster: ClusterSection {
            key_file: Some(key.to_path_buf()),
            ownership_datastore: Some(SHARED_DATASTORE.to_owned()),
            ..ClusterSection::default()
        },
        debug: DebugSection { faults: true },
        metrics: MetricsSection {
            address: Some(SocketAddr::from((host.mgmt_addr, METRICS_PORT))),
        },
        vmm: VmmSection {
            mode: lab_vmm_mode(),
        },
    }
}

/// `[vmm] mode` of the lab's agents: `FERRY_LAB_VMM=process` runs every guest in a `ferry vmm`
/// process of its own (to run any lab test that way); otherwise the agent's default.
pub fn lab_vmm_mode() -> VmmMode {
    match std::env::var("FERRY_LAB_VMM").as_deref() {
        Ok("process") => VmmMode::Process,
        Ok("inline") => VmmMode::Inline,
        _ => VmmMode::default(),
    }
}

/// `config` as the text of an `agent.toml`.
fn render(config: &Config) -> Result<String> {
    let body = toml::to_string(config).with_context(|| {
        format!(
            "cannot write the agent config of host {} as TOML (its paths must be valid UTF-8: \
             choose another --root)",
            config.agent.name
        )
    })?;
    Ok(format!("{HEADER}{body}"))
}

fn write_config(path: &Path, config: &Config) -> Result<()> {
    fs::write(path, render(config)?)
        .with_context(|| format!("cannot write agent config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::lab::{HostSpec, HOSTS};

    fn planned(root: &Path) -> Vec<LabHost> {
        HOSTS
            .iter()
            .map(|spec: &HostSpec| LabHost::planned("t", root, spec))
            .collect()
    }

    /// What each lab agent is told, read back the way the agent reads it.
    #[test]
    fn configs_parse_back_to_the_same_values() {
        let root = Path::new("/run/ferry/lab");
        let hosts = planned(root);
        let key = root.join("cluster.key");
        for h in &hosts {
            let config = agent_config(h, root, &hosts, &key);
            let text = render(&config).unwrap();
            let back = Config::parse(&text, &h.config).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(back, config, "{text}");
            assert!(text.starts_with("# A lab agent's config"), "{text}");
        }
    }

    #[test]
    fn config_of_a_is_the_lab_layout() {
        let root = Path::new("/run/ferry/lab");
        let hosts = planned(root);
        let c = agent_config(&hosts[0], root, &hosts, &root.join("cluster.key"));
        assert_eq!(c.agent.name, "a");
        assert_eq!(c.agent.socket, Path::new("/run/ferry/lab/a/agent.sock"));
        assert_eq!(c.agent.state_dir, Path::new("/run/ferry/lab/a/state"));
        let mgmt = c.management.as_ref().unwrap();
        assert_eq!(mgmt.address.to_string(), "198.18.0.1");
        assert_eq!(mgmt.port, DEFAULT_MANAGEMENT_PORT);
        let mig = c.migration.as_ref().unwrap();
        assert_eq!(mig.interface.as_deref(), Some("mig0"));
        assert_eq!(mig.address.to_string(), "198.18.1.1");
        assert_eq!(mig.link_speed.as_deref(), Some("40gbit"));
        assert!(mig.enabled && mig.ebpf && mig.pin && !mig.dedicated);
        assert_eq!(mig.encrypt, EncryptPolicy::Preferred);
        assert_eq!(
            c.datastores["shared"],
            Path::new("/run/ferry/lab/datastores/shared")
        );
        assert_eq!(
            c.datastores["local"],
            Path::new("/run/ferry/lab/datastores/local-a")
        );
        assert_eq!(c.datastores.len(), 2);
        assert_eq!(c.port_groups["vm-net"], "vmbr0");
        assert_eq!(c.port_groups.len(), 1);
        assert_eq!(
            c.peers.iter().collect::<Vec<_>>(),
            [(&"b".to_owned(), &"198.18.0.2".to_owned())]
        );
        assert_eq!(
            c.cluster.key_file.as_deref(),
            Some(Path::new("/run/ferry/lab/cluster.key"))
        );
        assert_eq!(c.cluster.ownership_datastore.as_deref(), Some("shared"));
        assert_eq!(
            c.cluster.lock_lease_s,
            ClusterSection::default().lock_lease_s
        );
        assert_eq!(
            c.metrics.address,
            Some(SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1), 9720)))
        );
        assert!(c.debug.faults);
        assert_eq!(c.limits, LimitsSection::default());
        assert!(c.cpu.mask.is_empty());
    }

    #[test]
    fn config_of_b_mirrors_a() {
        let root = Path::new("/r");
        let hosts = planned(root);
        let c = agent_config(&hosts[1], root, &hosts, &root.join("cluster.key"));
        assert_eq!(c.agent.name, "b");
        assert_eq!(c.management.unwrap().address.to_string(), "198.18.0.2");
        assert_eq!(c.migration.unwrap().address.to_string(), "198.18.1.2");
        assert_eq!(c.datastores["local"], Path::new("/r/datastores/local-b"));
        assert_eq!(
            c.peers.into_iter().collect::<Vec<_>>(),
            [("a".to_owned(), "198.18.0.1".to_owned())]
        );
        assert_eq!(
            c.metrics.address,
            Some(SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 9720)))
        );
    }

    /// Paths that need quoting and escaping in TOML come back unchanged.
    #[test]
    fn awkward_paths_survive_the_round_trip() {
        let root = Path::new("/tmp/a \"quoted\" root\\with\ttab\u{1}, ünïcode and 'apostrophes'");
        let hosts = planned(root);
        let config = agent_config(&hosts[0], root, &hosts, &root.join("cluster.key"));
        let text = render(&config).unwrap();
        let back =
            Config::parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, config);
        assert_eq!(back.agent.socket, root.join("a").join("agent.sock"));
    }

    #[test]
    fn a_root_that_is_not_utf8_is_refused_with_advice() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let root = Path::new(OsStr::from_bytes(b"/tmp/\xff"));
        let hosts = planned(root);
        let config = agent_config(&hosts[0], root, &hosts, &root.join("cluster.key"));
        let err = format!("{:#}", render(&config).unwrap_err());
        assert!(err.contains("choose another --root"), "{err}");
    }
}
