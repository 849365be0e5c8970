//! The CPU compatibility check between what a guest sees and what a host offers, and the
//! common baseline of several hosts, over the CPUID model of [`crate::vm::cpuid`] (features by
//! name, policies, the feature registers compared).

use std::collections::BTreeSet;

use crate::vm::cpuid::{FeatureBit, BASELINES, FEATURES};

/// Features a guest uses that a host does not offer.
pub fn missing(guest: &BTreeSet<FeatureBit>, host: &BTreeSet<FeatureBit>) -> Vec<FeatureBit> {
    guest.difference(host).copied().collect()
}

/// The highest psABI level whose features are all in `offered`.
pub fn level(offered: &BTreeSet<FeatureBit>) -> Option<&'static str> {
    let has = |lvl: u8| {
        FEATURES.iter().filter(|e| e.5 >= 1 && e.5 <= lvl).all(|e| {
            offered.contains(&FeatureBit {
                leaf: e.1,
                subleaf: e.2,
                reg: e.3,
                bit: e.4,
            })
        })
    };
    BASELINES.iter().rev().find(|b| has(b.1)).map(|b| b.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::cpuid::features;
    use crate::vm::cpuid::tests::table;

    #[test]
    fn compatibility_names_offenders_and_ignores_os_bits() {
        let guest = features(&table(1 << 28 | 1 << 27, 1 << 16));
        let host = features(&table(1 << 28, 0));
        let m = missing(&guest, &host);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].to_string(), "avx512f");
    }
}
