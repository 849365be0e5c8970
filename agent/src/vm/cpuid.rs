//! The guest's CPUID model: CPU features by name, CPUID policies (host, a psABI baseline, masks)
//! and applying them to a CPUID table. What a guest sees is shaped here; whether a host offers
//! it is `checks::cpu`'s question, asked over this model.
//!
//! A feature is one bit of a CPUID feature register: `(leaf, subleaf, register, bit)`. Only the
//! feature-flag registers are compared ([`FEATURE_REGS`]); bits that mirror guest OS state
//! (OSXSAVE, OSPKE) and the hypervisor bit are never compared.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One feature bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

impl std::fmt::Display for FeatureBit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match name_of(*self) {
            Some(n) => f.write_str(n),
            None => write!(
                f,
                "leaf {:#x}.{} {:?} bit {}",
                self.leaf, self.subleaf, self.reg, self.bit
            ),
        }
    }
}

/// The registers compared between hosts: (leaf, subleaf, register).
pub const FEATURE_REGS: [(u32, u32, Reg); 8] = [
    (1, 0, Reg::Ecx),
    (1, 0, Reg::Edx),
    (7, 0, Reg::Ebx),
    (7, 0, Reg::Ecx),
    (7, 0, Reg::Edx),
    (7, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
];

/// Bits never compared: they reflect guest OS state or hypervisor presence.
const IGNORED: [(u32, u32, Reg, u8); 3] = [
    (1, 0, Reg::Ecx, 27), // osxsave
    (1, 0, Reg::Ecx, 31), // hypervisor
    (7, 0, Reg::Ecx, 4),  // ospke
];

/// Named features: (name, leaf, subleaf, register, bit, psABI level: 0 = basic, 1..4 =
/// x86-64-v1..v4, 5 = beyond v4).
#[rustfmt::skip]
pub const FEATURES: &[(&str, u32, u32, Reg, u8, u8)] = &[
    ("fpu", 1, 0, Reg::Edx, 0, 0), ("vme", 1, 0, Reg::Edx, 1, 0), ("de", 1, 0, Reg::Edx, 2, 0),
    ("pse", 1, 0, Reg::Edx, 3, 0), ("tsc", 1, 0, Reg::Edx, 4, 0), ("msr", 1, 0, Reg::Edx, 5, 0),
    ("pae", 1, 0, Reg::Edx, 6, 0), ("mce", 1, 0, Reg::Edx, 7, 0), ("cx8", 1, 0, Reg::Edx, 8, 1),
    ("apic", 1, 0, Reg::Edx, 9, 0), ("sep", 1, 0, Reg::Edx, 11, 0), ("mtrr", 1, 0, Reg::Edx, 12, 0),
    ("pge", 1, 0, Reg::Edx, 13, 0), ("mca", 1, 0, Reg::Edx, 14, 0), ("cmov", 1, 0, Reg::Edx, 15, 1),
    ("pat", 1, 0, Reg::Edx, 16, 0), ("pse36", 1, 0, Reg::Edx, 17, 0), ("clflush", 1, 0, Reg::Edx, 19, 0),
    ("mmx", 1, 0, Reg::Edx, 23, 1), ("fxsr", 1, 0, Reg::Edx, 24, 1), ("sse", 1, 0, Reg::Edx, 25, 1),
    ("sse2", 1, 0, Reg::Edx, 26, 1), ("ss", 1, 0, Reg::Edx, 27, 0), ("ht", 1, 0, Reg::Edx, 28, 0),
    ("sse3", 1, 0, Reg::Ecx, 0, 2), ("pclmulqdq", 1, 0, Reg::Ecx, 1, 5), ("ssse3", 1, 0, Reg::Ecx, 9, 2),
    ("fma", 1, 0, Reg::Ecx, 12, 3), ("cx16", 1, 0, Reg::Ecx, 13, 2), ("pdcm", 1, 0, Reg::Ecx, 15, 0),
    ("pcid", 1, 0, Reg::Ecx, 17, 5), ("sse4_1", 1, 0, Reg::Ecx, 19, 2), ("sse4_2", 1, 0, Reg::Ecx, 20, 2),
    ("x2apic", 1, 0, Reg::Ecx, 21, 0), ("movbe", 1, 0, Reg::Ecx, 22, 3), ("popcnt", 1, 0, Reg::Ecx, 23, 2),
    ("tsc_deadline_timer", 1, 0, Reg::Ecx, 24, 0), ("aes", 1, 0, Reg::Ecx, 25, 5),
    ("xsave", 1, 0, Reg::Ecx, 26, 3), ("avx", 1, 0, Reg::Ecx, 28, 3), ("f16c", 1, 0, Reg::Ecx, 29, 3),
    ("rdrand", 1, 0, Reg::Ecx, 30, 5),
    ("fsgsbase", 7, 0, Reg::Ebx, 0, 5), ("bmi1", 7, 0, Reg::Ebx, 3, 3), ("hle", 7, 0, Reg::Ebx, 4, 5),
    ("avx2", 7, 0, Reg::Ebx, 5, 3), ("smep", 7, 0, Reg::Ebx, 7, 5), ("bmi2", 7, 0, Reg::Ebx, 8, 3),
    ("erms", 7, 0, Reg::Ebx, 9, 5), ("invpcid", 7, 0, Reg::Ebx, 10, 5), ("rtm", 7, 0, Reg::Ebx, 11, 5),
    ("mpx", 7, 0, Reg::Ebx, 14, 5), ("avx512f", 7, 0, Reg::Ebx, 16, 4), ("avx512dq", 7, 0, Reg::Ebx, 17, 4),
    ("rdseed", 7, 0, Reg::Ebx, 18, 5), ("adx", 7, 0, Reg::Ebx, 19, 5), ("smap", 7, 0, Reg::Ebx, 20, 5),
    ("avx512ifma", 7, 0, Reg::Ebx, 21, 5), ("clflushopt", 7, 0, Reg::Ebx, 23, 5), ("clwb", 7, 0, Reg::Ebx, 24, 5),
    ("avx512cd", 7, 0, Reg::Ebx, 28, 4), ("sha_ni", 7, 0, Reg::Ebx, 29, 5), ("avx512bw", 7, 0, Reg::Ebx, 30, 4),
    ("avx512vl", 7, 0, Reg::Ebx, 31, 4),
    ("avx512vbmi", 7, 0, Reg::Ecx, 1, 5), ("umip", 7, 0, Reg::Ecx, 2, 5), ("pku", 7, 0, Reg::Ecx, 3, 5),
    ("waitpkg", 7, 0, Reg::Ecx, 5, 5), ("avx512_vbmi2", 7, 0, Reg::Ecx, 6, 5), ("gfni", 7, 0, Reg::Ecx, 8, 5),
    ("vaes", 7, 0, Reg::Ecx, 9, 5), ("vpclmulqdq", 7, 0, Reg::Ecx, 10, 5), ("avx512_vnni", 7, 0, Reg::Ecx, 11, 5),
    ("avx512_bitalg", 7, 0, Reg::Ecx, 12, 5), ("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14, 5), ("la57", 7, 0, Reg::Ecx, 16, 5),
    ("rdpid", 7, 0, Reg::Ecx, 22, 5), ("movdiri", 7, 0, Reg::Ecx, 27, 5), ("movdir64b", 7, 0, Reg::Ecx, 28, 5),
    ("fsrm", 7, 0, Reg::Edx, 4, 5), ("avx512_vp2intersect", 7, 0, Reg::Edx, 8, 5), ("md_clear", 7, 0, Reg::Edx, 10, 0),
    ("serialize", 7, 0, Reg::Edx, 14, 5), ("amx_bf16", 7, 0, Reg::Edx, 22, 5), ("avx512_fp16", 7, 0, Reg::Edx, 23, 5),
    ("amx_tile", 7, 0, Reg::Edx, 24, 5), ("amx_int8", 7, 0, Reg::Edx, 25, 5), ("spec_ctrl", 7, 0, Reg::Edx, 26, 0),
    ("stibp", 7, 0, Reg::Edx, 27, 0), ("flush_l1d", 7, 0, Reg::Edx, 28, 0), ("arch_capabilities", 7, 0, Reg::Edx, 29, 0),
    ("ssbd", 7, 0, Reg::Edx, 31, 0),
    ("avx_vnni", 7, 1, Reg::Eax, 4, 5), ("avx512_bf16", 7, 1, Reg::Eax, 5, 5),
    ("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0, 2), ("cmp_legacy", 0x8000_0001, 0, Reg::Ecx, 1, 0),
    ("svm", 0x8000_0001, 0, Reg::Ecx, 2, 5), ("abm", 0x8000_0001, 0, Reg::Ecx, 5, 3),
    ("sse4a", 0x8000_0001, 0, Reg::Ecx, 6, 5), ("misalignsse", 0x8000_0001, 0, Reg::Ecx, 7, 5),
    ("3dnowprefetch", 0x8000_0001, 0, Reg::Ecx, 8, 5), ("xop", 0x8000_0001, 0, Reg::Ecx, 11, 5),
    ("fma4", 0x8000_0001, 0, Reg::Ecx, 16, 5), ("tbm", 0x8000_0001, 0, Reg::Ecx, 21, 5),
    ("syscall", 0x8000_0001, 0, Reg::Edx, 11, 1), ("nx", 0x8000_0001, 0, Reg::Edx, 20, 0),
    ("mmxext", 0x8000_0001, 0, Reg::Edx, 22, 5), ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26, 5),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27, 5), ("lm", 0x8000_0001, 0, Reg::Edx, 29, 1),
];

/// Named CPU models that hide everything above a psABI level.
pub const BASELINES: [(&str, u8); 4] = [
    ("x86-64-v1", 1),
    ("x86-64-v2", 2),
    ("x86-64-v3", 3),
    ("x86-64-v4", 4),
];

/// Errors of CPU policies.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuError {
    #[error("unknown CPU feature {0:?}: use a name like avx512f, or leaf:subleaf:reg:bit like 7:0:ebx:16")]
    UnknownFeature(String),
    #[error("unknown CPU model {0:?}: use host, x86-64-v1, x86-64-v2, x86-64-v3 or x86-64-v4")]
    UnknownModel(String),
}

fn name_of(f: FeatureBit) -> Option<&'static str> {
    FEATURES
        .iter()
        .find(|e| e.1 == f.leaf && e.2 == f.subleaf && e.3 == f.reg && e.4 == f.bit)
        .map(|e| e.0)
}

/// A feature by name (`avx512f`) or by position (`7:0:ebx:16`, numbers decimal or 0x-hex).
pub fn parse_feature(s: &str) -> Result<FeatureBit, CpuError> {
    let t = s.trim().to_ascii_lowercase();
    if let Some(e) = FEATURES.iter().find(|e| e.0 == t) {
        return Ok(FeatureBit {
            leaf: e.1,
            subleaf: e.2,
            reg: e.3,
            bit: e.4,
        });
    }
    let bad = || CpuError::UnknownFeature(s.to_string());
    let parts: Vec<&str> = t.split(':').collect();
    let [leaf, sub, reg, bit] = parts.as_slice() else {
        return Err(bad());
    };
    let num = |x: &str| -> Option<u32> {
        match x.strip_prefix("0x") {
            Some(h) => u32::from_str_radix(h, 16).ok(),
            None => x.parse().ok(),
        }
    };
    let reg = match *reg {
        "eax" => Reg::Eax,
        "ebx" => Reg::Ebx,
        "ecx" => Reg::Ecx,
        "edx" => Reg::Edx,
        _ => return Err(bad()),
    };
    let bit = num(bit).filter(|b| *b < 32).ok_or_else(bad)? as u8;
    Ok(FeatureBit {
        leaf: num(leaf).ok_or_else(bad)?,
        subleaf: num(sub).ok_or_else(bad)?,
        reg,
        bit,
    })
}

/// How a guest's CPU is shaped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpuPolicy {
    /// "host" (everything this host offers) or a baseline like "x86-64-v3".
    pub model: String,
    /// Features hidden from the guest: names or leaf:subleaf:reg:bit.
    pub mask: Vec<String>,
}

impl Default for CpuPolicy {
    fn default() -> Self {
        CpuPolicy {
            model: "host".into(),
            mask: Vec::new(),
        }
    }
}

impl CpuPolicy {
    /// The feature bits this policy hides.
    pub fn hidden(&self) -> Result<BTreeSet<FeatureBit>, CpuError> {
        let mut out = BTreeSet::new();
        if self.model != "host" {
            let level = BASELINES
                .iter()
                .find(|b| b.0 == self.model)
                .map(|b| b.1)
                .ok_or_else(|| CpuError::UnknownModel(self.model.clone()))?;
            for e in FEATURES.iter().filter(|e| e.5 > level) {
                out.insert(FeatureBit {
                    leaf: e.1,
                    subleaf: e.2,
                    reg: e.3,
                    bit: e.4,
                });
            }
        }
        for m in &self.mask {
            out.insert(parse_feature(m)?);
        }
        Ok(out)
    }
}

/// A CPUID table entry, independent of kvm-bindings (what travels between agents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

fn reg_mut(e: &mut CpuidEntry, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn reg(e: &CpuidEntry, r: Reg) -> u32 {
    match r {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

/// Clear `hidden` bits in a CPUID table.
pub fn apply(entries: &mut [CpuidEntry], hidden: &BTreeSet<FeatureBit>) {
    for e in entries.iter_mut() {
        let (function, index) = (e.function, e.index);
        for f in hidden
            .iter()
            .filter(|f| f.leaf == function && f.subleaf == index)
        {
            *reg_mut(e, f.reg) &= !(1u32 << f.bit);
        }
    }
}

/// The feature bits set in a CPUID table (over [`FEATURE_REGS`], ignored bits left out).
pub fn features(entries: &[CpuidEntry]) -> BTreeSet<FeatureBit> {
    let mut out = BTreeSet::new();
    for (leaf, sub, r) in FEATURE_REGS {
        let Some(e) = entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || leaf != 7))
        else {
            continue;
        };
        let v = reg(e, r);
        for bit in 0..32u8 {
            if v & (1 << bit) != 0
                && !IGNORED
                    .iter()
                    .any(|i| i.0 == leaf && i.1 == sub && i.2 == r && i.3 == bit)
            {
                out.insert(FeatureBit {
                    leaf,
                    subleaf: sub,
                    reg: r,
                    bit,
                });
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CPUID table with leaf 1's ECX and leaf 7's EBX (the checks' tests use it too).
    pub(crate) fn table(ecx1: u32, ebx7: u32) -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 1,
                index: 0,
                eax: 0,
                ebx: 0,
                ecx: ecx1,
                edx: 0,
            },
            CpuidEntry {
                function: 7,
                index: 0,
                eax: 0,
                ebx: ebx7,
                ecx: 0,
                edx: 0,
            },
        ]
    }

    #[test]
    fn names_and_positions() {
        let f = parse_feature("avx512f").unwrap();
        assert_eq!((f.leaf, f.subleaf, f.reg, f.bit), (7, 0, Reg::Ebx, 16));
        assert_eq!(parse_feature("7:0:ebx:16").unwrap(), f);
        assert_eq!(parse_feature("0x7:0:EBX:16").unwrap(), f);
        assert_eq!(f.to_string(), "avx512f");
        assert!(parse_feature("warp_drive").is_err());
        assert!(parse_feature("7:0:ebx:40").is_err());
        let odd = parse_feature("7:0:ebx:1").unwrap();
        assert_eq!(odd.to_string(), "leaf 0x7.0 Ebx bit 1");
    }

    #[test]
    fn masks_and_baselines_hide_bits() {
        let mut t = table(1 << 28 | 1 << 20, 1 << 16 | 1 << 5);
        let p = CpuPolicy {
            model: "host".into(),
            mask: vec!["avx512f".into()],
        };
        apply(&mut t, &p.hidden().unwrap());
        assert_eq!(t[1].ebx, 1 << 5);
        let v2 = CpuPolicy {
            model: "x86-64-v2".into(),
            mask: vec![],
        };
        apply(&mut t, &v2.hidden().unwrap());
        assert_eq!(t[0].ecx, 1 << 20, "avx (v3) hidden, sse4_2 (v2) kept");
        assert_eq!(t[1].ebx, 0, "avx2 (v3) hidden");
        assert!(CpuPolicy {
            model: "pentium".into(),
            mask: vec![]
        }
        .hidden()
        .is_err());
    }
}
