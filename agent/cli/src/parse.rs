//! Arguments into what the API takes: sizes, addresses, disks, NICs, and the request that
//! creates a VM. A bad argument is a usage error (exit code 2).

use std::path::PathBuf;

use ferry::control::api::CreateRequest;
use ferry::vm::cpuid::CpuPolicy;
use ferry::vm::{DiskSpec, GuestKind, NicSpec, Profile, RawMode, RawParams, WorkloadParams};

use crate::args::{CreateArgs, KindArg, ProfileArg, RawModeArg};
use crate::{fail, Failure};

/// A `--codec` value.
pub(crate) fn parse_codec(s: &str) -> Result<ferry::migrate::tune::CodecChoice, String> {
    s.parse()
        .map_err(|e: ferry::migrate::OptionError| e.to_string())
}

/// A stable, locally administered MAC for NIC `i` of VM `name`.
pub fn derived_mac(name: &str, i: usize) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes().chain([i as u8]) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

fn parse_disks(args: &[String]) -> Result<Vec<DiskSpec>, Failure> {
    args.iter()
        .map(|d| {
            let (path, size) = d.rsplit_once(':').ok_or_else(|| Failure {
                code: 2,
                message: format!("--disk {d:?}: write \"[datastore] dir/file.img:SIZE\""),
            })?;
            let size_mib = parse_size_mib(size).map_err(|m| Failure {
                code: 2,
                message: m,
            })?;
            Ok(DiskSpec {
                path: path.trim().to_string(),
                size_mib,
            })
        })
        .collect()
}

fn parse_nics(vm: &str, args: &[String]) -> Vec<NicSpec> {
    args.iter()
        .enumerate()
        .map(|(i, n)| match n.split_once('@') {
            Some((mac, pg)) => NicSpec {
                mac: mac.to_ascii_lowercase(),
                port_group: pg.to_string(),
            },
            None => NicSpec {
                mac: derived_mac(vm, i),
                port_group: n.to_string(),
            },
        })
        .collect()
}

/// Parse "1G", "512M", "2GiB", "1024" (MiB) into MiB.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower
        .strip_suffix("gib")
        .or_else(|| lower.strip_suffix("gb"))
        .or_else(|| lower.strip_suffix('g'))
    {
        (n, 1024)
    } else if let Some(n) = lower
        .strip_suffix("mib")
        .or_else(|| lower.strip_suffix("mb"))
        .or_else(|| lower.strip_suffix('m'))
    {
        (n, 1)
    } else if let Some(n) = lower
        .strip_suffix("tib")
        .or_else(|| lower.strip_suffix("tb"))
        .or_else(|| lower.strip_suffix('t'))
    {
        (n, 1024 * 1024)
    } else {
        (lower.as_str(), 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{t:?} is not a size; write e.g. 1G, 512M or 1024 (MiB)"))
}

/// A number, decimal or 0x-hex.
pub(crate) fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{t:?} is not a number (decimal or 0x-hex)"))
}

/// A real-mode entry point, CS:IP in hex.
pub(crate) fn parse_entry(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not CS:IP in hex, e.g. 0000:7c00");
    let (cs, ip) = s.split_once(':').ok_or_else(bad)?;
    Ok((
        u16::from_str_radix(cs, 16).map_err(|_| bad())?,
        u16::from_str_radix(ip, 16).map_err(|_| bad())?,
    ))
}

/// `p` made absolute against the working directory (the agent does not share it).
pub(crate) fn absolute(p: &std::path::Path) -> Result<PathBuf, Failure> {
    std::path::absolute(p).map_err(|e| fail(format!("{}: {e}", p.display())))
}

/// Parse "A.B.C.D/N".
fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (ip, prefix) = s.split_once('/').ok_or_else(|| {
        format!("--ip {s:?}: write the address with its prefix, e.g. 198.18.2.10/24")
    })?;
    let ip = ip
        .parse()
        .map_err(|_| format!("--ip {s:?}: {ip:?} is not an IPv4 address"))?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("--ip {s:?}: {prefix:?} is not a prefix length (0-32)"))?;
    Ok((ip, prefix))
}

/// The API request `ferry vm create` sends.
pub fn create_request(a: &CreateArgs) -> Result<CreateRequest, Failure> {
    let usage = |m: &str| Failure {
        code: 2,
        message: m.to_string(),
    };
    if a.kind != KindArg::Service
        && (a.ip.is_some() || a.gateway.is_some() || a.journal_rate != 0 || a.program.is_some())
    {
        return Err(usage(
            "--ip, --gateway, --journal-rate and --program are for --kind service",
        ));
    }
    let kind = match a.kind {
        KindArg::Service => {
            if a.image.is_some() {
                return Err(usage(
                    "--image is for --kind raw (a service guest takes --program)",
                ));
            }
            let ip = a.ip.as_deref().ok_or_else(|| {
                usage("--kind service needs --ip ADDR/PREFIX, e.g. 198.18.2.10/24")
            })?;
            let (ip, prefix_len) = parse_cidr(ip).map_err(|m| usage(&m))?;
            let u32_of = |v: u64, what: &str| {
                u32::try_from(v).map_err(|_| usage(&format!("{what} {v} is too large")))
            };
            GuestKind::Service(ferry::vm::ServiceParams {
                ip,
                prefix_len,
                gateway: a.gateway,
                journal_rate: a.journal_rate,
                working_set_mib: u32_of(a.working_set.unwrap_or(0), "--working-set")?,
                dirty_rate_mib: u32_of(a.dirty_rate, "--dirty-rate")?,
                program: a.program.as_deref().map(absolute).transpose()?,
            })
        }
        KindArg::Workload => {
            if a.image.is_some() {
                return Err(Failure {
                    code: 2,
                    message: "--image is for --kind raw".into(),
                });
            }
            GuestKind::Workload(WorkloadParams {
                profile: match a.profile {
                    ProfileArg::Zero => Profile::Zero,
                    ProfileArg::Random => Profile::Random,
                    ProfileArg::Text => Profile::Text,
                    ProfileArg::Mixed => Profile::Mixed,
                },
                dirty_rate_mib: a.dirty_rate,
                working_set_mib: a.working_set,
            })
        }
        KindArg::Raw => {
            let image = a.image.as_ref().ok_or_else(|| Failure {
                code: 2,
                message: "--kind raw needs --image FILE".into(),
            })?;
            GuestKind::Raw(RawParams {
                image: absolute(image)?,
                mode: match a.mode {
                    RawModeArg::Real => RawMode::Real,
                    RawModeArg::LongUser => RawMode::LongUser,
                },
                load_addr: a.load_addr,
                cs: a.entry.0,
                ip: a.entry.1,
            })
        }
    };
    Ok(CreateRequest {
        name: a.name.clone(),
        memory_mib: a.memory,
        vcpus: a.vcpus,
        kind,
        disks: parse_disks(&a.disk)?,
        nics: parse_nics(&a.name, &a.nic),
        cpu: CpuPolicy {
            model: a.cpu_model.clone(),
            mask: a.cpu_mask.clone(),
        },
        start: a.start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command, VmCommand};
    use clap::{CommandFactory, Parser};

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("512m"), Ok(512));
        assert_eq!(parse_size_mib("300"), Ok(300));
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("99999999999999999999T").is_err());
        assert_eq!(parse_entry("0000:7c00"), Ok((0, 0x7c00)));
        assert!(parse_entry("7c00").is_err());
        assert_eq!(parse_u64("0x400000"), Ok(0x400000));
    }

    #[test]
    fn service_create_arguments() {
        let parse = |args: &[&str]| {
            let mut v = vec!["ferry", "vm", "create", "s1", "--kind", "service"];
            v.extend_from_slice(args);
            let cli = Cli::try_parse_from(v).unwrap();
            let Command::Vm(VmCommand::Create(a)) = cli.command else {
                panic!()
            };
            create_request(&a)
        };
        let r = parse(&[
            "--ip",
            "198.18.2.10/24",
            "--journal-rate",
            "200",
            "--working-set",
            "64M",
            "--dirty-rate",
            "16",
        ])
        .unwrap();
        let GuestKind::Service(p) = r.kind else {
            panic!("not a service kind")
        };
        assert_eq!(p.ip, std::net::Ipv4Addr::new(198, 18, 2, 10));
        assert_eq!(
            (
                p.prefix_len,
                p.journal_rate,
                p.working_set_mib,
                p.dirty_rate_mib
            ),
            (24, 200, 64, 16)
        );
        for (args, needle) in [
            (&[][..], "needs --ip"),
            (&["--ip", "198.18.2.10"][..], "prefix"),
            (&["--ip", "198.18.2/24"][..], "not an IPv4"),
            (&["--ip", "198.18.2.10/40"][..], "prefix length"),
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.code, 2);
            assert!(
                e.message.contains(needle),
                "{:?} lacks {needle:?}",
                e.message
            );
        }
        let cli =
            Cli::try_parse_from(["ferry", "vm", "create", "w", "--ip", "198.18.2.10/24"]).unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!()
        };
        assert!(create_request(&a)
            .unwrap_err()
            .message
            .contains("--kind service"));
    }

    #[test]
    fn raw_without_image_is_a_usage_error() {
        let cli = Cli::try_parse_from(["ferry", "vm", "create", "x", "--kind", "raw"]).unwrap();
        let Command::Vm(VmCommand::Create(a)) = cli.command else {
            panic!()
        };
        let e = create_request(&a).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("--image"));
    }
}
