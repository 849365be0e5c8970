//! x86-64 boot scaffolding for guests that start directly in 64-bit long mode at CPL3: a GDT
//! with user segments, a TSS, identity-mapped page tables with the user bit set, and the matching
//! special registers.
//!
//! On this lab's paravirtual KVM only CPL3 long-mode code runs natively (see LAB.md), so the
//! built-in workload guest never runs at CPL0: it starts in user mode, and its TSS carries an
//! I/O permission bitmap that allows every port, so `in`/`out` at CPL3 reach the VMM as I/O exits.
//! (RFLAGS.IOPL=3 would do the same on hardware KVM, but the paravirtual backend here forces IOPL
//! to 0 and honours only the bitmap.) There is no IDT, so any exception becomes a triple fault, which the
//! runtime reports as a crash.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::memory::{GuestMemory, MemoryError, RegionLayout};

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the 64-bit TSS and its I/O permission bitmap (0x5000..0x7069).
pub const TSS_ADDR: u64 = 0x5000;
/// TSS header size; the I/O bitmap starts right after it.
const TSS_HEADER: u64 = 0x68;
/// One bit per port, plus the terminating all-ones byte.
const IO_BITMAP_BYTES: u64 = 0x2000 + 1;
/// TSS limit covering header and bitmap.
const TSS_LIMIT: u64 = TSS_HEADER + IO_BITMAP_BYTES - 1;
/// PML4; PDPT follows; page directories after that.
pub const PML4_ADDR: u64 = 0x10000;
const PDPT_ADDR: u64 = PML4_ADDR + 0x1000;
const PD_ADDR: u64 = PDPT_ADDR + 0x1000;
/// The largest guest-physical address the page tables can map (one PDPT: 512 GiB).
pub const MAX_MAPPED: u64 = 512 << 30;

pub const SEL_KERNEL_CODE: u16 = 0x08;
pub const SEL_USER_DATA: u16 = 0x18 | 3;
pub const SEL_USER_CODE: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS for user code: only the reserved-one bit (port access comes from the TSS bitmap).
pub const RFLAGS_USER_IO: u64 = 0x2;

/// End of the area used by the scaffolding for `max_gpa` bytes of address space.
pub fn scaffolding_end(max_gpa: u64) -> u64 {
    PD_ADDR + max_gpa.div_ceil(1 << 30) * 0x1000
}

fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Write the GDT, the TSS and identity page tables (2 MiB pages, user-accessible, accessed and
/// dirty bits preset so the CPU never writes them) covering `[0, max_gpa)`.
pub fn write_scaffolding(mem: &GuestMemory, max_gpa: u64) -> Result<(), MemoryError> {
    let max_gpa = max_gpa.min(MAX_MAPPED);
    let gdt = [
        0u64,
        gdt_entry(0xa09b, 0, 0xfffff), // kernel code64
        gdt_entry(0xc093, 0, 0xfffff), // kernel data
        gdt_entry(0xc0f3, 0, 0xfffff), // user data, DPL3
        gdt_entry(0xa0fb, 0, 0xfffff), // user code64, DPL3
        // 64-bit TSS (busy), two slots.
        gdt_entry(0x008b, TSS_ADDR, TSS_LIMIT),
        TSS_ADDR >> 32,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_u64(GDT_ADDR + 8 * i as u64, *e)?;
    }
    // TSS: I/O map base right after the header; a bitmap of zeros allows every port, and the
    // architecture wants one trailing byte of ones.
    let mut tss = vec![0u8; (TSS_HEADER + IO_BITMAP_BYTES) as usize];
    tss[0x66..0x68].copy_from_slice(&(TSS_HEADER as u16).to_le_bytes());
    if let Some(last) = tss.last_mut() {
        *last = 0xff;
    }
    mem.write(TSS_ADDR, &tss)?;

    const P_RW_US_A: u64 = 0x1 | 0x2 | 0x4 | 0x20;
    const LARGE_D: u64 = 0x40 | 0x80;
    mem.write_u64(PML4_ADDR, PDPT_ADDR | P_RW_US_A)?;
    let gibs = max_gpa.div_ceil(1 << 30);
    let mut pd = vec![0u8; 4096];
    for g in 0..gibs {
        let pd_addr = PD_ADDR + g * 0x1000;
        mem.write_u64(PDPT_ADDR + 8 * g, pd_addr | P_RW_US_A)?;
        for (j, e) in pd.chunks_exact_mut(8).enumerate() {
            let addr = (g << 30) | ((j as u64) << 21);
            e.copy_from_slice(&(addr | P_RW_US_A | LARGE_D).to_le_bytes());
        }
        mem.write(pd_addr, &pd)?;
    }
    Ok(())
}

/// The highest guest-physical address of a layout.
pub fn max_gpa(layout: &[RegionLayout]) -> u64 {
    layout.iter().map(RegionLayout::end).max().unwrap_or(0)
}

fn user_seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit long mode at CPL3 with the scaffolding above.
pub fn long_mode_user_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = user_seg(SEL_USER_CODE, true);
    let data = user_seg(SEL_USER_DATA, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT as u32,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        present: 1,
        limit: 0xffff,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers to enter user code at `rip` with the given stack and two arguments.
pub fn user_regs(rip: u64, rsp: u64, rdi: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rdi,
        rsi,
        rflags: RFLAGS_USER_IO,
        ..Default::default()
    }
}

/// Special registers for 16-bit real mode starting at `cs:ip` (the raw image kind).
pub fn real_mode_sregs(mut sregs: kvm_sregs, cs: u16) -> kvm_sregs {
    let seg = |selector: u16, code: bool| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(cs, true);
    sregs.ds = seg(0, false);
    sregs.es = seg(0, false);
    sregs.fs = seg(0, false);
    sregs.gs = seg(0, false);
    sregs.ss = seg(0, false);
    sregs.cr0 = CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_known_values() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xa0fb, 0, 0xfffff), 0x00af_fb00_0000_ffff);
    }

    #[test]
    fn scaffolding_fits() {
        // TSS + bitmap end below the program at 0x8000; page tables fit below 2.1 MiB.
        const { assert!(TSS_ADDR + TSS_LIMIT < 0x8000) };
        assert!(scaffolding_end(MAX_MAPPED) <= 0x220000);
        assert_eq!(scaffolding_end(1 << 30), PD_ADDR + 0x1000);
    }
}
