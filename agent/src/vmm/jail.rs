//! The VMM's jail, after Firecracker's jailer: what a VMM can reach once its guest is set up.
//!
//! 1. [`enter_mount_namespace`] — first thing, while the process has one thread: a mount
//!    namespace of its own with private propagation (nothing it mounts leaks out, nothing
//!    mounted on the host later appears in it).
//! 2. Setup in the namespace: /dev/kvm, the VM, guest memory (memfds), taps, disk images, the
//!    listening socket — every file the guest will ever need is opened here.
//! 3. [`drop_privileges`]: the capability bounding set emptied, then every thread switches to
//!    an unprivileged uid/gid with no supplementary groups (glibc applies set*id to all
//!    threads, and the kernel clears the permitted and effective capabilities of a thread whose
//!    uids all leave 0), so no thread keeps a capability.
//! 4. [`install_seccomp`]: no_new_privs and a seccomp filter, synchronised to every thread
//!    (`SECCOMP_FILTER_FLAG_TSYNC`) and inherited by threads spawned later. The filter is an
//!    allow-list of what the vCPU, device and socket threads call; anything else kills the whole
//!    process (SIGSYS). No `open*`, `execve`, `socket`, `connect`, `bind`, `kill`, `ptrace`,
//!    `mount` or `fork`-like `clone`: the filesystem and the network are out of reach, and the
//!    VMM can signal only its own threads.
//!
//! docs/vmm.md lists what a jailed VMM can still reach.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

/// Errors entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what} failed: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: uid and gid must not be 0 (the VMM drops root); got uid {uid}, gid {gid}")]
    Root { uid: u32, gid: u32 },
    #[error("jail: the seccomp filter: {0}")]
    Seccomp(String),
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), JailError> {
    if rc < 0 {
        return Err(sys(what)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// What the filter does with a system call outside the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the VMM (SIGSYS). The default, and what the agent uses.
    #[default]
    Kill,
    /// Allow it but have the kernel log it (audit): for finding what a new kernel or libc
    /// needs. Never for production.
    Log,
}

/// Enter a mount namespace of our own with private propagation. Must run while the process has
/// one thread (a mount namespace is per thread until threads are created from it).
pub fn enter_mount_namespace() -> Result<(), JailError> {
    // SAFETY: unshare(2) with a flag only; affects this (single-threaded) process.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check(rc, "unshare(CLONE_NEWNS)")?;
    // SAFETY: mount(2) with a constant NUL-terminated target and null source/type/data: only
    // changes the propagation of every mount in our new namespace to private.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check(rc, "making / private in the VMM's mount namespace")
}

/// Empty the capability bounding set and the ambient set, then become `uid`/`gid` (every
/// thread), which leaves no thread any capability.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    if uid == 0 || gid == 0 {
        return Err(JailError::Root { uid, gid });
    }
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: past the kernel's last capability.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(sys("dropping the capability bounding set")(e));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no ambient capabilities to clear");
    }
    // SAFETY: setgroups with an empty list (null pointer, length 0).
    let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(rc, "setgroups")?;
    // SAFETY: set*id with plain integers; glibc applies them to every thread.
    let rc = unsafe { libc::setresgid(gid, gid, gid) };
    check(rc, "setresgid")?;
    // SAFETY: as above.
    let rc = unsafe { libc::setresuid(uid, uid, uid) };
    check(rc, "setresuid")?;
    // Belt and braces: nothing is left to clear, but make it explicit for this thread.
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a valid v3 header and two zeroed data words (the kernel reads them).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } as libc::c_int;
    check(rc, "capset")
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Install the seccomp filter on every thread (no_new_privs first).
pub fn install_seccomp(mode: SeccompMode) -> Result<(), JailError> {
    for prog in filters(mode)? {
        seccompiler::apply_filter_all_threads(&prog)
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// Make a system call the filter forbids (`--test-requests` only): under the filter the kernel
/// kills the VMM with SIGSYS and this does not return.
pub fn forbidden_syscall() {
    // A TCP socket: harmless, and exactly what a jailed VMM must not make (it has no network
    // but its taps). (`openat` is not used: it fails with EACCES instead of killing, see
    // `filters`.)
    // SAFETY: socket(2) with constant arguments; the result is closed if it comes back.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: closing the descriptor just made.
        unsafe { libc::close(fd) };
    }
}

// The KVM ioctls a running VMM issues (on the VM fd and the vCPU fds; none on /dev/kvm).
ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, kvm_bindings::KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, kvm_bindings::KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, kvm_bindings::KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, kvm_bindings::KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, kvm_bindings::KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, kvm_bindings::KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, kvm_bindings::KVMIO, 0x8c, kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, kvm_bindings::KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, kvm_bindings::KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, kvm_bindings::KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, kvm_bindings::KVMIO, 0x90, kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_CPUID2, kvm_bindings::KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, kvm_bindings::KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, kvm_bindings::KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0x9f,
    kvm_vcpu_events
);
ioctl_iow_nr!(
    KVM_SET_VCPU_EVENTS,
    kvm_bindings::KVMIO,
    0xa0,
    kvm_vcpu_events
);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, kvm_bindings::KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, kvm_bindings::KVMIO, 0xa2, kvm_debugregs);
ioctl_io_nr!(KVM_SET_TSC_KHZ, kvm_bindings::KVMIO, 0xa2);
ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, kvm_bindings::KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, kvm_bindings::KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, kvm_bindings::KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, kvm_bindings::KVMIO, 0xa7, kvm_xcrs);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, kvm_bindings::KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    kvm_bindings::KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, kvm_bindings::KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_SET_IRQCHIP, kvm_bindings::KVMIO, 0x63, kvm_irqchip);
ioctl_iow_nr!(KVM_SET_CLOCK, kvm_bindings::KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, kvm_bindings::KVMIO, 0x7c, kvm_clock_data);

fn kvm_ioctls() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_SET_TSC_KHZ(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
        KVM_GET_DIRTY_LOG(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_GET_IRQCHIP(),
        KVM_SET_IRQCHIP(),
        KVM_SET_CLOCK(),
        KVM_GET_CLOCK(),
    ]
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, JailError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| JailError::Seccomp(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, JailError> {
    SeccompRule::new(conds).map_err(|e| JailError::Seccomp(e.to_string()))
}

/// One rule per value: argument `arg` equals it.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, JailError> {
    values
        .iter()
        .map(|v| rule(vec![cond(arg, SeccompCmpOp::Eq, *v)?]))
        .collect()
}

/// The allow-list, by system call number (an empty rule list: any arguments).
pub fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, JailError> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Unconditional: memory, threads' own housekeeping, time, I/O on descriptors already open.
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // The socket server: connections on the listener opened before the jail.
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
        // KVM's memory slots come from memfds; punching holes (discard) is on our own fds.
        libc::SYS_fallocate,
    ] {
        m.insert(nr, vec![]);
    }
    // Signals: only to our own threads (the vCPU kick).
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    m.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, pid)?])?],
    );
    // Threads only, never a new process: clone must carry CLONE_THREAD. clone3's flags live in
    // memory the filter cannot read: it fails with ENOSYS (see `filter`), and libc falls back
    // to clone.
    m.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?])?],
    );
    // Thread names only.
    m.insert(libc::SYS_prctl, any_of(0, &[libc::PR_SET_NAME as u64])?);
    // Socket timeouts on accepted connections.
    m.insert(
        libc::SYS_setsockopt,
        vec![
            rule(vec![
                cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)?,
                cond(2, SeccompCmpOp::Eq, libc::SO_RCVTIMEO as u64)?,
            ])?,
            rule(vec![
                cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)?,
                cond(2, SeccompCmpOp::Eq, libc::SO_SNDTIMEO as u64)?,
            ])?,
        ],
    );
    // Descriptor flags (non-blocking toggles, seals read by nobody here).
    m.insert(
        libc::SYS_fcntl,
        any_of(
            1,
            &[
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
            ],
        )?,
    );
    // KVM: the run loop, state save/restore, dirty log, interrupt controller, clock.
    m.insert(libc::SYS_ioctl, any_of(1, &kvm_ioctls())?);
    Ok(m)
}

/// The programs to install, in order: one that makes `clone3` fail with ENOSYS and `openat`
/// with EACCES, then the allow-list (which lets both through, and not `seccomp`: it must come
/// last). The kernel runs every installed filter and takes the most restrictive answer (KILL
/// over ERRNO over ALLOW), so `clone3` and `openat` fail and everything outside the allow-list
/// kills. `openat` fails rather than kills because glibc opens files on its own in ordinary
/// calls: `free` shrinking a thread arena's heap reads `/proc/sys/vm/overcommit_memory` once
/// (and takes a failure as "do not shrink"); a VMM must not die of that, and it opens nothing.
fn filters(mode: SeccompMode) -> Result<Vec<BpfProgram>, JailError> {
    let err = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
    let mut rules = rules()?;
    rules.insert(libc::SYS_clone3, vec![]);
    rules.insert(libc::SYS_openat, vec![]);
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into().map_err(err)?;
    let allow = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(err)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    let openat = SeccompFilter::new(
        [(libc::SYS_openat, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(err)?;
    Ok(vec![
        clone3.try_into().map_err(err)?,
        openat.try_into().map_err(err)?,
        allow.try_into().map_err(err)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_lists_kvm_run() {
        let r = rules().unwrap();
        assert!(r.contains_key(&libc::SYS_ioctl));
        assert!(!r.contains_key(&libc::SYS_openat));
        assert!(!r.contains_key(&libc::SYS_execve));
        assert!(!r.contains_key(&libc::SYS_socket));
        assert!(!r.contains_key(&libc::SYS_kill));
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        let f = filters(SeccompMode::Kill).unwrap();
        assert_eq!(f.len(), 3);
        assert!(f[2].len() > 50);
    }
}
