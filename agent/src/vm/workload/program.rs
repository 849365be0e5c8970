//! The workload guest's program, written with iced-x86's assembler: fill, then paced work
//! passes, with heartbeats and yields (see the parent module for what it does).

use iced_x86::code_asm::*;

use super::*;

pub(super) fn build_program() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut write_page = a.create_label();
    let mut fill_loop = a.create_label();
    let mut fill_done = a.create_label();
    let mut work_loop = a.create_label();
    let mut ahead = a.create_label();
    let mut yield_clamped = a.create_label();
    let mut idle = a.create_label();
    let mut due = a.create_label();
    let mut no_forgive = a.create_label();
    let mut no_wrap = a.create_label();

    // Entry: rdi = this vCPU's parameter block, rsi = its heartbeat slot, rsp = its stack.
    a.mov(r15, rdi)?;
    a.mov(r14, rsi)?;
    a.mov(ebx, PARAMS_ADDR as u32)?;
    a.mov(rax, HEARTBEAT_MAGIC)?;
    a.mov(qword_ptr(r14 + HB_MAGIC), rax)?;
    a.xor(r12d, r12d)?; // pass
    a.xor(r13d, r13d)?; // cursor

    // Phase 0: fill the slice once.
    a.set_label(&mut fill_loop)?;
    a.cmp(r13, qword_ptr(r15 + V_FILL_LEN))?;
    a.jae(fill_done)?;
    a.mov(rax, qword_ptr(r15 + V_FILL_START))?;
    a.add(rax, r13)?;
    a.mov(r9d, 1)?;
    a.call(write_page)?;
    a.inc(r13)?;
    a.mov(qword_ptr(r14 + HB_FILLED), r13)?;
    a.inc(qword_ptr(r14 + HB_BEATS))?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(r14 + HB_TSC), rax)?;
    a.jmp(fill_loop)?;

    a.set_label(&mut fill_done)?;
    a.mov(r12d, 1)?;
    a.xor(r13d, r13d)?;
    a.mov(qword_ptr(r14 + HB_PHASE), 1)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r11, rax)?; // next due TSC

    // Phase 1: paced re-writes of the working set.
    a.set_label(&mut work_loop)?;
    a.inc(qword_ptr(r14 + HB_BEATS))?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(r14 + HB_TSC), rax)?;
    a.cmp(qword_ptr(rbx + G_IDLE), 0)?;
    a.jne(idle)?;
    a.cmp(qword_ptr(r15 + V_WS_LEN), 0)?;
    a.je(idle)?;
    a.cmp(rax, r11)?;
    a.jae(due)?;
    // Ahead of pace by rcx cycles: spin if little, else yield.
    a.set_label(&mut ahead)?;
    a.mov(rcx, r11)?;
    a.sub(rcx, rax)?;
    a.cmp(rcx, qword_ptr(rbx + G_SPIN))?;
    a.jb(work_loop)?;
    a.mov(rax, rcx)?;
    a.mov(edx, 0xffff_ffffu32)?;
    a.cmp(rax, rdx)?;
    a.jbe(yield_clamped)?;
    a.mov(rax, rdx)?;
    a.set_label(&mut yield_clamped)?;
    a.mov(dx, YIELD_PORT as u32)?;
    a.out(dx, eax)?;
    a.inc(qword_ptr(r14 + HB_YIELDS))?;
    a.jmp(work_loop)?;

    a.set_label(&mut idle)?;
    a.mov(eax, 0xffff_ffffu32)?;
    a.mov(dx, YIELD_PORT as u32)?;
    a.out(dx, eax)?;
    a.inc(qword_ptr(r14 + HB_YIELDS))?;
    a.jmp(work_loop)?;

    // Due: forgive debt beyond the burst window, then write the next page.
    a.set_label(&mut due)?;
    a.mov(rcx, rax)?;
    a.sub(rcx, r11)?;
    a.cmp(rcx, qword_ptr(rbx + G_BURST))?;
    a.jbe(no_forgive)?;
    a.mov(r11, rax)?;
    a.sub(r11, qword_ptr(rbx + G_BURST))?;
    a.set_label(&mut no_forgive)?;
    a.mov(rax, qword_ptr(r15 + V_FILL_START))?;
    a.add(rax, r13)?;
    a.xor(r9d, r9d)?;
    a.call(write_page)?;
    a.add(r11, qword_ptr(rbx + G_CPP))?;
    a.inc(qword_ptr(r14 + HB_PROGRESS))?;
    a.inc(r13)?;
    a.cmp(r13, qword_ptr(r15 + V_WS_LEN))?;
    a.jb(no_wrap)?;
    a.xor(r13d, r13d)?;
    a.inc(r12)?;
    a.set_label(&mut no_wrap)?;
    a.jmp(work_loop)?;

    // write_page(rax = page index, r12 = pass, r9 = 1 when filling). Clobbers rax, rcx, rdx,
    // rdi, rsi, r8.
    let mut have_class = a.create_label();
    let mut high = a.create_label();
    let mut addr_done = a.create_label();
    let mut nonzero = a.create_label();
    let mut done = a.create_label();
    let mut text_loop = a.create_label();
    let mut rand_loop = a.create_label();
    a.set_label(&mut write_page)?;
    a.mov(r8, rax)?;
    a.mov(rcx, qword_ptr(rbx + G_PROFILE))?;
    a.cmp(rcx, Profile::Mixed.code() as i32)?;
    a.jne(have_class)?;
    a.mov(rax, r8)?;
    a.mov(rdx, K_CLASS)?;
    a.imul_2(rax, rdx)?;
    a.shr(rax, 62)?;
    a.xor(ecx, ecx)?; // classes 0 and 1: zero
    a.cmp(rax, 2)?;
    a.jb(have_class)?;
    a.mov(ecx, Profile::Text.code() as u32)?;
    a.je(have_class)?;
    a.mov(ecx, Profile::Random.code() as u32)?;
    a.set_label(&mut have_class)?;
    a.mov(rdi, r8)?;
    a.cmp(rdi, qword_ptr(rbx + G_R0_PAGES))?;
    a.jae(high)?;
    a.shl(rdi, 12)?;
    a.add(rdi, qword_ptr(rbx + G_R0_BASE))?;
    a.jmp(addr_done)?;
    a.set_label(&mut high)?;
    a.sub(rdi, qword_ptr(rbx + G_R0_PAGES))?;
    a.shl(rdi, 12)?;
    a.add(rdi, qword_ptr(rbx + G_R1_BASE))?;
    a.set_label(&mut addr_done)?;
    a.test(rcx, rcx)?;
    a.jnz(nonzero)?;
    a.test(r9, r9)?;
    a.jnz(done)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 512)?;
    a.rep().stosq()?;
    a.set_label(&mut done)?;
    a.ret()?;

    a.set_label(&mut nonzero)?;
    a.mov(rax, r12)?;
    a.shl(rax, 32)?;
    a.mov(edx, r8d)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rdi, 8)?;
    a.lea(rax, qword_ptr(r8 + 1))?;
    a.mov(rdx, K_CLASS)?;
    a.imul_2(rax, rdx)?;
    a.mov(rsi, rax)?;
    a.lea(rax, qword_ptr(r12 + 1))?;
    a.mov(rdx, K_PASS)?;
    a.imul_2(rax, rdx)?;
    a.xor(rsi, rax)?;
    a.or(rsi, 1)?;
    a.mov(edx, 511)?;
    a.cmp(rcx, Profile::Text.code() as i32)?;
    a.je(text_loop)?;

    a.set_label(&mut rand_loop)?;
    xorshift(&mut a)?;
    a.mov(qword_ptr(rdi), rsi)?;
    a.add(rdi, 8)?;
    a.dec(edx)?;
    a.jnz(rand_loop)?;
    a.ret()?;

    a.set_label(&mut text_loop)?;
    xorshift(&mut a)?;
    a.mov(rax, rsi)?;
    a.shr(rax, 60)?;
    a.mov(rax, qword_ptr(rbx + rax * 8 + G_TEXT))?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rdi, 8)?;
    a.dec(edx)?;
    a.jnz(text_loop)?;
    a.ret()?;

    a.assemble(CODE_ADDR)
}

fn xorshift(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, rsi)?;
    a.shl(rax, 13)?;
    a.xor(rsi, rax)?;
    a.mov(rax, rsi)?;
    a.shr(rax, 7)?;
    a.xor(rsi, rax)?;
    a.mov(rax, rsi)?;
    a.shl(rax, 17)?;
    a.xor(rsi, rax)?;
    Ok(())
}
