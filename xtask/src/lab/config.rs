//! Each lab agent's `agent.toml`, and the cluster key the agents share.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::lifecycle::local_datastore;
use super::{Lab, LabHost, LAB_LINK_SPEED, METRICS_PORT, MIGRATION_IFACE, PORT_GROUP, VM_BRIDGE};

impl Lab {
    /// The cluster key both lab agents share (created once per lab, mode 0600).
    pub fn cluster_key(&self) -> PathBuf {
        self.root.join("cluster.key")
    }

    pub(super) fn write_configs(&self) -> Result<()> {
        let key = self.cluster_key();
        if !key.exists() {
            let mut bytes = [0u8; 32];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                .context("cannot read /dev/urandom for the lab's cluster key")?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key)
                .with_context(|| format!("cannot create {}", key.display()))?;
            std::io::Write::write_all(&mut f, hex.as_bytes())?;
        }
        for h in &self.hosts {
            let peers: Vec<(&str, Ipv4Addr)> = self
                .hosts
                .iter()
                .filter(|p| p.name != h.name)
                .map(|p| (p.name.as_str(), p.mgmt_addr))
                .collect();
            let text = render_agent_config(
                h,
                &self.shared_datastore(),
                &local_datastore(&self.root, &h.name),
                &peers,
            )? + &format!(
                "\n[cluster]\nkey_file = {}\nownership_datastore = \"shared\"\n\n\
                 [metrics]\naddress = \"{}:{METRICS_PORT}\"\n\n\
                 # The lab is a test bench: it accepts fault injection.\n[debug]\nfaults = true\n",
                toml_path(&key)?,
                h.mgmt_addr
            );
            fs::write(&h.config, text)
                .with_context(|| format!("cannot write agent config {}", h.config.display()))?;
        }
        Ok(())
    }
}

/// Renders `ROOT/<host>/agent.toml` in the exact format the agent accepts.
fn render_agent_config(
    host: &LabHost,
    shared: &Path,
    local: &Path,
    peers: &[(&str, Ipv4Addr)],
) -> Result<String> {
    let mut peer_lines = String::new();
    for (name, addr) in peers {
        peer_lines.push_str(&format!("{} = \"{addr}\"\n", toml_key(name)?));
    }
    Ok(format!(
        "[agent]\n\
         name = {name}\n\
         socket = {socket}\n\
         state_dir = {state_dir}\n\
         \n\
         [management]\n\
         address = \"{mgmt}\"\n\
         \n\
         [migration]\n\
         interface = \"{MIGRATION_IFACE}\"\n\
         address = \"{migration}\"\n\
         link_speed = \"{LAB_LINK_SPEED}\"\n\
         \n\
         [datastores]\n\
         shared = {shared}\n\
         local = {local}\n\
         \n\
         [port_groups]\n\
         {PORT_GROUP} = \"{VM_BRIDGE}\"\n\
         \n\
         [peers]\n\
         {peer_lines}",
        name = toml_string(&host.name),
        socket = toml_path(&host.socket)?,
        state_dir = toml_path(&host.state_dir)?,
        mgmt = host.mgmt_addr,
        migration = host.migration_addr,
        shared = toml_path(shared)?,
        local = toml_path(local)?,
    ))
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| {
        anyhow!(
            "path {} is not valid UTF-8, which the agent config cannot hold: choose another --root",
            p.display()
        )
    })?;
    Ok(toml_string(s))
}

/// A bare TOML key (the host names are fixed, so this only guards against misuse).
fn toml_key(k: &str) -> Result<&str> {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(k)
    } else {
        bail!("{k:?} cannot be a bare TOML key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::HOSTS;

    fn host_a(root: &Path) -> LabHost {
        LabHost::planned("t", root, &HOSTS[0])
    }

    #[test]
    fn agent_config_matches_the_documented_format() {
        let root = Path::new("/run/ferry/lab");
        let a = host_a(root);
        let text = render_agent_config(
            &a,
            &root.join("datastores/shared"),
            &local_datastore(root, "a"),
            &[("b", Ipv4Addr::new(198, 18, 0, 2))],
        )
        .unwrap();
        let expected = r#"[agent]
name = "a"
socket = "/run/ferry/lab/a/agent.sock"
state_dir = "/run/ferry/lab/a/state"

[management]
address = "198.18.0.1"

[migration]
interface = "mig0"
address = "198.18.1.1"
link_speed = "40gbit"

[datastores]
shared = "/run/ferry/lab/datastores/shared"
local = "/run/ferry/lab/datastores/local-a"

[port_groups]
vm-net = "vmbr0"

[peers]
b = "198.18.0.2"
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn agent_config_of_b_mirrors_a() {
        let root = Path::new("/r");
        let b = LabHost::planned("t", root, &HOSTS[1]);
        let text = render_agent_config(
            &b,
            &root.join("datastores/shared"),
            &local_datastore(root, "b"),
            &[("a", HOSTS[0].mgmt)],
        )
        .unwrap();
        assert!(text.contains("name = \"b\"\n"));
        assert!(text.contains("[management]\naddress = \"198.18.0.2\"\n"));
        assert!(text.contains("address = \"198.18.1.2\"\n"));
        assert!(text.contains("local = \"/r/datastores/local-b\"\n"));
        assert!(text.ends_with("[peers]\na = \"198.18.0.1\"\n"));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("x\ny\u{1}"), "\"x\\ny\\u0001\"");
        assert!(toml_key("vm-net").is_ok());
        assert!(toml_key("a b").is_err());
        assert!(toml_key("").is_err());
    }
}
