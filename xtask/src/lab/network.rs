//! A lab's network: its namespaces, the veth pairs and bridges between them, addresses, and the
//! wait until every interface is up.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::ip::{parse_operstates, NetnsAddLock};
use super::names::{namespace_names, switch_port};
use super::{
    Lab, CLIENT_ADDR, CLIENT_IFACE, CLIENT_SWITCH_PORT, LINK_UP_TIMEOUT, MGMT_IFACE,
    MIGRATION_IFACE, PREFIX_LEN, SWITCH_BRIDGE, UPLINK_IFACE, VM_BRIDGE, VM_NET_PREFIX_LEN,
};

impl Lab {
    pub(super) fn make_namespaces(&mut self) -> Result<()> {
        for ns in namespace_names(&self.name) {
            {
                let _lock = NetnsAddLock::acquire()?;
                self.ip.run(&["netns", "add", &ns]).with_context(|| {
                    format!("cannot create network namespace {ns} (is this kernel built with network namespaces?)")
                })?;
            }
            self.created_netns.push(ns.clone());
            self.ip.run(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub(super) fn make_links(&self) -> Result<()> {
        let (a, b) = (&self.hosts[0], &self.hosts[1]);
        let sw = self.switch_netns.as_str();
        let ip = &self.ip;
        for iface in [MGMT_IFACE, MIGRATION_IFACE] {
            ip.run(&[
                "-n", &a.netns, "link", "add", iface, "type", "veth", "peer", "name", iface,
                "netns", &b.netns,
            ])
            .context("cannot create a veth pair: is the `veth` kernel module available?")?;
        }
        ip.run(&["-n", sw, "link", "add", SWITCH_BRIDGE, "type", "bridge"])
            .context("cannot create a bridge: is the `bridge` kernel module available?")?;
        for h in &self.hosts {
            let port = switch_port(&h.name);
            ip.run(&["-n", &h.netns, "link", "add", VM_BRIDGE, "type", "bridge"])?;
            ip.run(&[
                "-n",
                &h.netns,
                "link",
                "add",
                UPLINK_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                sw,
            ])?;
            ip.run(&[
                "-n",
                &h.netns,
                "link",
                "set",
                UPLINK_IFACE,
                "master",
                VM_BRIDGE,
            ])?;
            ip.run(&["-n", sw, "link", "set", &port, "master", SWITCH_BRIDGE])?;
            for (iface, addr) in [
                (MGMT_IFACE, h.mgmt_addr),
                (MIGRATION_IFACE, h.migration_addr),
            ] {
                let cidr = format!("{addr}/{PREFIX_LEN}");
                ip.run(&["-n", &h.netns, "addr", "add", &cidr, "dev", iface])?;
            }
            for iface in [MGMT_IFACE, MIGRATION_IFACE, UPLINK_IFACE, VM_BRIDGE] {
                ip.run(&["-n", &h.netns, "link", "set", iface, "up"])?;
            }
            ip.run(&["-n", sw, "link", "set", &port, "up"])?;
        }
        // The client of the guests: a machine on the VM network, plugged into the switch.
        let cl = self.client_netns.as_str();
        ip.run(&[
            "-n",
            cl,
            "link",
            "add",
            CLIENT_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_SWITCH_PORT,
            "netns",
            sw,
        ])?;
        ip.run(&[
            "-n",
            sw,
            "link",
            "set",
            CLIENT_SWITCH_PORT,
            "master",
            SWITCH_BRIDGE,
        ])?;
        let cidr = format!("{CLIENT_ADDR}/{VM_NET_PREFIX_LEN}");
        ip.run(&["-n", cl, "addr", "add", &cidr, "dev", CLIENT_IFACE])?;
        ip.run(&["-n", cl, "link", "set", CLIENT_IFACE, "up"])?;
        ip.run(&["-n", sw, "link", "set", CLIENT_SWITCH_PORT, "up"])?;
        ip.run(&["-n", sw, "link", "set", SWITCH_BRIDGE, "up"])?;
        Ok(())
    }

    /// Waits until every lab interface reports operstate UP, so that callers can send traffic
    /// as soon as `up` returns.
    pub(super) fn wait_links_up(&self) -> Result<()> {
        let mut want: Vec<(&str, Vec<String>)> = self
            .hosts
            .iter()
            .map(|h| {
                let ifaces = [MGMT_IFACE, MIGRATION_IFACE, UPLINK_IFACE, VM_BRIDGE];
                (h.netns.as_str(), ifaces.map(str::to_owned).to_vec())
            })
            .collect();
        let mut sw_ifaces: Vec<String> = self.hosts.iter().map(|h| switch_port(&h.name)).collect();
        sw_ifaces.push(SWITCH_BRIDGE.to_owned());
        sw_ifaces.push(CLIENT_SWITCH_PORT.to_owned());
        want.push((self.switch_netns.as_str(), sw_ifaces));
        want.push((self.client_netns.as_str(), vec![CLIENT_IFACE.to_owned()]));

        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        loop {
            let mut down = Vec::new();
            for (ns, ifaces) in &want {
                let json = self.ip.run(&["-n", ns, "-j", "link", "show"])?;
                let states = parse_operstates(&json)
                    .with_context(|| format!("cannot parse `ip -j link show` in {ns}"))?;
                for iface in ifaces {
                    let up = states
                        .iter()
                        .any(|(name, state)| name == iface && state == "UP");
                    if !up {
                        down.push(format!("{ns}/{iface}"));
                    }
                }
            }
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "interfaces did not come up within {LINK_UP_TIMEOUT:?}: {}",
                    down.join(", ")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}
