//! Dirty bitmaps: one bit per page, per region and for the whole guest.

use super::{RegionLayout, PAGE_SIZE};

/// Dirty pages of one region, one bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionBitmap {
    pub layout: RegionLayout,
    pub bits: Vec<u64>,
}

impl RegionBitmap {
    pub fn empty(layout: RegionLayout) -> Self {
        RegionBitmap {
            layout,
            bits: vec![0; layout.pages().div_ceil(64) as usize],
        }
    }
    pub fn full(layout: RegionLayout) -> Self {
        let mut b = Self::empty(layout);
        for p in 0..layout.pages() {
            b.set(p);
        }
        b
    }
    pub fn set(&mut self, page: u64) {
        self.bits[(page / 64) as usize] |= 1 << (page % 64);
    }
    pub fn get(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// Dirty page indices (relative to the region), ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }
}

/// Dirty pages of the whole guest, as returned by [`GuestMemory::take_dirty`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub regions: Vec<RegionBitmap>,
}

impl DirtyBitmap {
    pub fn count(&self) -> u64 {
        self.regions.iter().map(RegionBitmap::count).sum()
    }
    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn iter_gpa(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions
            .iter()
            .flat_map(|r| r.iter().map(move |p| r.layout.gpa + p * PAGE_SIZE))
    }
    /// Whether the page at `gpa` is marked.
    pub fn contains(&self, gpa: u64) -> bool {
        self.regions.iter().any(|r| {
            gpa >= r.layout.gpa && gpa < r.layout.end() && r.get((gpa - r.layout.gpa) / PAGE_SIZE)
        })
    }
    /// OR another bitmap of the same layout into this one.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            for (x, y) in a.bits.iter_mut().zip(&b.bits) {
                *x |= *y;
            }
        }
    }
}
