//! Is the local clock synchronised? (G8)
//!
//! Gateways without a real-time clock boot with a wrong time; readings stamped by the
//! local clock before synchronisation carry `flags::CLOCK_UNSYNCED`.
//!
//! The kernel knows (the `STA_UNSYNC` bit of `adjtimex`), but the hardened unit's
//! `ProtectClock=` installs a seccomp filter that refuses `adjtimex` even for reading
//! (`EPERM`). So the answer is learned, in order, from:
//!
//! 1. `/run/systemd/timesync/synchronized`, which systemd-timesyncd creates once it
//!    has synchronised the clock (readable by everyone, allowed by the unit);
//! 2. `adjtimex` with no modes set (read-only), when the seccomp filter allows it
//!    (outside the unit, or with chrony/ntpd on a unit without `ProtectClock=`);
//! 3. otherwise "not synchronised": the agent cannot vouch for the clock, and an honest
//!    flag is better than a silent wrong time.
//!
//! The answer is cached for a second: serial sources ask for every line.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The file systemd-timesyncd creates once the clock is synchronised.
pub const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

/// How long an answer is reused.
const CACHE_MILLIS: u64 = 1000;

/// What the kernel's `adjtimex` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelClock {
    Synchronized,
    Unsynchronized,
    /// The call was refused (seccomp under `ProtectClock=`) or failed.
    Unavailable,
}

/// Whether the local clock is known to be synchronised (cached for a second).
pub fn is_synchronized() -> bool {
    // Bit 63: an answer is cached; bit 62: the answer; low bits: milliseconds since START.
    static START: OnceLock<Instant> = OnceLock::new();
    static CACHE: AtomicU64 = AtomicU64::new(0);
    const CACHED: u64 = 1 << 63;
    const ANSWER: u64 = 1 << 62;
    let now_ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64 & (ANSWER - 1);
    let cached = CACHE.load(Ordering::Relaxed);
    if cached & CACHED != 0 && now_ms.saturating_sub(cached & (ANSWER - 1)) < CACHE_MILLIS {
        return cached & ANSWER != 0;
    }
    let answer = decide(Path::new(TIMESYNC_FLAG).exists(), kernel_clock);
    CACHE.store(
        CACHED | if answer { ANSWER } else { 0 } | now_ms,
        Ordering::Relaxed,
    );
    answer
}

/// The decision, with its inputs passed in so it can be tested.
pub fn decide(timesync_flag_exists: bool, kernel: impl FnOnce() -> KernelClock) -> bool {
    timesync_flag_exists || kernel() == KernelClock::Synchronized
}

/// Asks the kernel through `adjtimex` without changing anything (`modes = 0`).
pub fn kernel_clock() -> KernelClock {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `timex` is plain data; zeroed means "read only" (modes = 0), and the
        // kernel only writes into the struct we own.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        let state = unsafe { libc::adjtimex(&mut tx) };
        classify_adjtimex(state, tx.status)
    }
    #[cfg(not(target_os = "linux"))]
    {
        KernelClock::Unavailable
    }
}

/// Interprets `adjtimex`'s return value and status bits.
#[cfg(target_os = "linux")]
pub fn classify_adjtimex(state: libc::c_int, status: libc::c_int) -> KernelClock {
    if state < 0 {
        KernelClock::Unavailable
    } else if state == libc::TIME_ERROR || status & libc::STA_UNSYNC != 0 {
        KernelClock::Unsynchronized
    } else {
        KernelClock::Synchronized
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timesync_flag_wins_without_asking_the_kernel() {
        assert!(decide(true, || panic!("adjtimex must not be called")));
        assert!(decide(false, || KernelClock::Synchronized));
        assert!(!decide(false, || KernelClock::Unsynchronized));
        assert!(
            !decide(false, || KernelClock::Unavailable),
            "refused adjtimex: cannot vouch"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn adjtimex_results() {
        assert_eq!(classify_adjtimex(-1, 0), KernelClock::Unavailable);
        assert_eq!(
            classify_adjtimex(libc::TIME_OK, 0),
            KernelClock::Synchronized
        );
        assert_eq!(
            classify_adjtimex(libc::TIME_OK, libc::STA_UNSYNC),
            KernelClock::Unsynchronized
        );
        assert_eq!(
            classify_adjtimex(libc::TIME_ERROR, 0),
            KernelClock::Unsynchronized
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn agrees_with_the_kernel_here() {
        // Whatever this machine's state is, the public answer matches its inputs and is
        // stable within the cache window.
        let expected = decide(Path::new(TIMESYNC_FLAG).exists(), kernel_clock);
        assert_eq!(is_synchronized(), expected);
        assert_eq!(is_synchronized(), expected);
    }

    /// Under a seccomp filter like `ProtectClock=`'s, adjtimex fails and the answer is
    /// "not synchronised" unless timesyncd's flag exists. Runs the check in a child
    /// process that installs such a filter (needs no privileges: NO_NEW_PRIVS first).
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn refused_adjtimex_is_unavailable() {
        if std::env::var_os("OUTPOST_CLOCK_CHILD").is_some() {
            install_adjtimex_filter();
            assert_eq!(kernel_clock(), KernelClock::Unavailable);
            assert_eq!(is_synchronized(), Path::new(TIMESYNC_FLAG).exists());
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "clock::tests::refused_adjtimex_is_unavailable",
                "--nocapture",
            ])
            .env("OUTPOST_CLOCK_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "child failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }

    /// A classic BPF seccomp filter returning EPERM for adjtimex and clock_adjtime, as
    /// systemd's `ProtectClock=` does.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn install_adjtimex_filter() {
        use libc::{sock_filter, sock_fprog};
        const BPF_LD_W_ABS: u16 = 0x20;
        const BPF_JEQ_K: u16 = 0x15;
        const BPF_RET_K: u16 = 0x06;
        const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
        const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
        let stmt = |code, k| sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        let jeq = |k, jt, jf| sock_filter {
            code: BPF_JEQ_K,
            jt,
            jf,
            k,
        };
        let filter = [
            stmt(BPF_LD_W_ABS, 0), // seccomp_data.nr
            jeq(libc::SYS_adjtimex as u32, 2, 0),
            jeq(libc::SYS_clock_adjtime as u32, 1, 0),
            stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
            stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        ];
        let prog = sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut sock_filter,
        };
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const sock_fprog
                ),
                0
            );
        }
    }
}
