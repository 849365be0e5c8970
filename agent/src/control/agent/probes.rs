//! Questions to peers: the pre-migration checks (`ferry check`), ICMP and throughput probes of
//! the migration link (`ferry ping`), and the CPU baseline of a set of hosts (`ferry cpu
//! baseline`).

use crate::checks::ProbeError;
use serde::{Deserialize, Serialize};

use crate::checks::{CheckReport, HostFacts, LinkProbe, Requirements};
use crate::migrate as mig;
use crate::migrate::dest::Host;

use super::{blocking, Agent, AgentError};

/// CPU features common to a set of hosts (`ferry cpu baseline`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub hosts: Vec<String>,
    /// The highest psABI level every host offers in full.
    pub level: Option<String>,
    /// Named features every host offers.
    pub common: Vec<String>,
    /// Features some hosts offer and others do not: mask these on guests that must move
    /// between all of them.
    pub mask: Vec<String>,
}

impl Agent {
    fn local_probe(&self, peer: &HostFacts) -> Result<LinkProbe, ProbeError> {
        let m = self
            .config
            .migration
            .as_ref()
            .ok_or(ProbeError::NotConfigured)?;
        let std::net::IpAddr::V4(local) = m.address else {
            return Err(ProbeError::NotIpv4);
        };
        let remote: std::net::Ipv4Addr = peer
            .migration_address
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| ProbeError::PeerNotIpv4(peer.name.clone()))?;
        let r = crate::checks::ping::ping(
            local,
            remote,
            m.interface.as_deref(),
            3,
            std::time::Duration::from_millis(100),
            std::time::Duration::from_millis(500),
        )?;
        Ok(LinkProbe {
            sent: r.sent,
            received: r.received,
            detail: format!(
                "{} -> {} via {}: {}/{} replies{}",
                r.local,
                r.remote,
                r.interface.as_deref().unwrap_or("any NIC"),
                r.received,
                r.sent,
                r.rtt_avg_ms
                    .map(|a| format!(", {a:.2} ms average"))
                    .unwrap_or_default()
            ),
        })
    }

    /// Every pre-migration check of `vm` against peer `to`.
    pub async fn check(&self, vm: &str, to: &str) -> Result<CheckReport, AgentError> {
        let e = self.entry(vm)?;
        let v = e.vm();
        let spec = v.spec().clone();
        let disks: std::collections::BTreeMap<String, u64> = spec
            .disks
            .iter()
            .map(|d| {
                (
                    d.path.clone(),
                    self.datastores
                        .disk_size(&d.path)
                        .unwrap_or(d.size_mib << 20),
                )
            })
            .collect();
        let req = Requirements {
            vm: spec.name.clone(),
            memory_mib: spec.memory_mib,
            cpuid: v.cpuid(),
            disks,
            port_groups: spec.nics.iter().map(|n| n.port_group.clone()).collect(),
        };
        let peer = self.peer_addr(to)?;
        let me = self.identity();
        let query = mig::query::Query {
            disks: spec.disks.iter().map(|d| d.path.clone()).collect(),
        };
        let pf = tokio::task::spawn_blocking(move || mig::query::facts(peer, &me, &query))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| {
                AgentError::Conflict(format!(
                    "cannot ask {to} about itself: {}",
                    crate::util::error_chain(&e)
                ))
            })?;
        let local = self.host_facts(&[]);
        let probe = if local.migration_enabled && pf.migration_enabled {
            self.local_probe(&pf)
        } else {
            Err(ProbeError::NotEnabled)
        };
        let mut items = crate::checks::evaluate(&req, &local, &pf, probe.as_ref());
        items.extend(crate::checks::disk_lock_items(vm, &self.disk_locks(&spec)));
        Ok(CheckReport::new(vm, to, items))
    }

    /// ICMP probes over the migration network to a peer (`ferry ping PEER`).
    pub async fn ping(&self, to: &str) -> Result<crate::checks::ping::PingReport, AgentError> {
        let m = self.config.migration.clone().ok_or_else(|| {
            AgentError::Invalid("migration is not configured here: add [migration]".into())
        })?;
        let std::net::IpAddr::V4(local) = m.address else {
            return Err(AgentError::Invalid(
                "the migration address is not IPv4".into(),
            ));
        };
        let peer = self.peer_addr(to)?;
        let me = self.identity();
        let pf = tokio::task::spawn_blocking(move || {
            mig::query::facts(peer, &me, &mig::query::Query::default())
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .map_err(|e| {
            AgentError::Conflict(format!(
                "cannot reach {to}: {}",
                crate::util::error_chain(&e)
            ))
        })?;
        let remote: std::net::Ipv4Addr = pf
            .migration_address
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| AgentError::Conflict(format!("{to} has no IPv4 migration address")))?;
        blocking(move || {
            crate::checks::ping::ping(
                local,
                remote,
                m.interface.as_deref(),
                5,
                std::time::Duration::from_millis(200),
                std::time::Duration::from_secs(1),
            )
            .map_err(|e| AgentError::Internal(e.to_string()))
        })
        .await
    }

    /// The CPU baseline common to this host and `peers`.
    pub async fn cpu_baseline(&self, peers: Vec<String>) -> Result<Baseline, AgentError> {
        use crate::checks::cpu;
        use crate::vm::cpuid;
        let mut all = vec![self.host_facts(&[])];
        for p in peers {
            let addr = self.peer_addr(&p)?;
            let me = self.identity();
            let f = tokio::task::spawn_blocking(move || {
                mig::query::facts(addr, &me, &mig::query::Query::default())
            })
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| {
                AgentError::Conflict(format!("cannot ask {p}: {}", crate::util::error_chain(&e)))
            })?;
            all.push(f);
        }
        let sets: Vec<_> = all.iter().map(|f| cpuid::features(&f.cpuid)).collect();
        let mut common = sets[0].clone();
        let mut any = sets[0].clone();
        for s in &sets[1..] {
            common = common.intersection(s).copied().collect();
            any.extend(s.iter().copied());
        }
        Ok(Baseline {
            hosts: all.iter().map(|f| f.name.clone()).collect(),
            level: cpu::level(&common).map(str::to_string),
            common: common.iter().map(|f| f.to_string()).collect(),
            mask: any.difference(&common).map(|f| f.to_string()).collect(),
        })
    }
}

/// Body of `POST /v1/ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    /// A name from `[peers]` or a management address.
    pub to: String,
    /// A throughput blast; without it, ICMP probes (RTT, loss, path MTU).
    #[serde(default)]
    pub throughput: Option<mig::blast::BlastRequest>,
}

impl Agent {
    /// A throughput probe over the migration network to a peer.
    pub async fn ping_throughput(
        &self,
        req: PingRequest,
    ) -> Result<mig::blast::BlastResult, AgentError> {
        let throughput = req
            .throughput
            .clone()
            .ok_or_else(|| AgentError::Invalid("no throughput request".into()))?;
        throughput
            .validate()
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let local = self
            .migration_addr()
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let peer = self.peer_addr(&req.to)?;
        let me = self.identity();
        blocking(move || {
            mig::blast::run(peer, local, &me, &throughput).map_err(|e| match e {
                mig::MigrateError::Config(m) => AgentError::Invalid(m),
                other => AgentError::Conflict(format!(
                    "the throughput probe failed: {}",
                    crate::util::error_chain(&other)
                )),
            })
        })
        .await
    }
}
