//! glibc's malloc hands large freed blocks back to the kernel, and serves
//! large requests with fresh `mmap`s: every forward pass then page-faults its
//! activations in again, zeroed by the kernel. With fbgemm's int8 linears,
//! whose scratch buffers are allocated on every call, a batch-8 pass of
//! vit-msn-small took 1.7 times as long (docs/performance.md). ONNX Runtime
//! and OpenVINO avoid it with arenas of their own; libtorch's CPU allocator
//! is plain malloc, so the remedy is malloc's own settings.

use std::sync::OnceLock;

/// Requests below this are served from the heap, not a fresh mapping.
const MMAP_THRESHOLD: i32 = 1 << 30;
/// Free memory at the top of the heap is kept up to this much.
const TRIM_THRESHOLD: i32 = i32::MAX;

/// The environment variable that, set to `1`, leaves malloc as it is.
pub const OPT_OUT: &str = "VIT_MSN_SYSTEM_MALLOC";

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MallocTuning {
    /// The thresholds are set for this process.
    Set,
    /// Left alone: `VIT_MSN_SYSTEM_MALLOC=1`, or `GLIBC_TUNABLES` already
    /// names malloc settings (the user's choice wins).
    LeftToUser,
    /// Not glibc, or glibc refused the values: malloc is unchanged.
    Unavailable,
}

/// Makes glibc's malloc keep freed blocks for reuse (process-wide, once):
/// requests up to 1 GiB come from the heap, and freed memory is not trimmed
/// back to the kernel. The process's RSS then stays near its peak instead of
/// falling between passes. [`crate::Bundle`] calls this when it loads on
/// the CPU unless [`crate::bundle::LoadOptions::keep_freed_memory`] is off.
pub fn keep_freed_memory() -> MallocTuning {
    static DONE: OnceLock<MallocTuning> = OnceLock::new();
    *DONE.get_or_init(|| {
        let opt_out = std::env::var(OPT_OUT).ok();
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        if left_to_user(opt_out.as_deref(), tunables.as_deref()) {
            MallocTuning::LeftToUser
        } else {
            set_thresholds()
        }
    })
}

/// Hands the heap's free pages back to the kernel (`malloc_trim`), which
/// malloc otherwise keeps after [`keep_freed_memory`]. Returns whether any
/// memory went back.
pub fn release_freed_memory() -> bool {
    release()
}

/// Calls [`release_freed_memory`] when dropped. A [`crate::Bundle`] that
/// set malloc to keep freed memory holds one as its last field, so that its
/// weights leave the process's RSS when it goes (a server's hot swap or
/// unload) instead of waiting in the heap.
#[derive(Debug)]
pub struct ReleaseOnDrop(());

impl ReleaseOnDrop {
    /// One when [`keep_freed_memory`] has set malloc's thresholds; `None`
    /// when malloc keeps its own behaviour, which needs no help.
    pub fn if_kept() -> Option<Self> {
        (keep_freed_memory() == MallocTuning::Set).then_some(Self(()))
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_freed_memory();
    }
}

/// Whether the environment (`VIT_MSN_SYSTEM_MALLOC`, `GLIBC_TUNABLES`) keeps
/// malloc as the user has it.
fn left_to_user(opt_out: Option<&str>, tunables: Option<&str>) -> bool {
    opt_out == Some("1") || tunables.is_some_and(|t| t.contains("glibc.malloc."))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> MallocTuning {
    // SAFETY: mallopt only changes malloc's parameters; glibc takes its own
    // lock, so it is safe while other threads allocate.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    };
    if ok {
        MallocTuning::Set
    } else {
        MallocTuning::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> MallocTuning {
    MallocTuning::Unavailable
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release() -> bool {
    // SAFETY: malloc_trim takes malloc's locks and only returns free pages.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_can_leave_malloc_alone() {
        assert!(!left_to_user(None, None));
        assert!(left_to_user(Some("1"), None));
        assert!(!left_to_user(Some("0"), None));
        assert!(left_to_user(None, Some("glibc.malloc.trim_threshold=1")));
        assert!(left_to_user(
            None,
            Some("glibc.cpu.hwcaps=-AVX512F:glibc.malloc.mmap_threshold=1")
        ));
        assert!(!left_to_user(None, Some("glibc.cpu.hwcaps=-AVX512F")));
    }

    /// After the call, a freed 16 MiB block stays in malloc's heap for the
    /// next pass, where glibc's defaults would have unmapped it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_blocks_stay_in_the_heap() {
        let opt_out = std::env::var(OPT_OUT).ok();
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        let expected = if left_to_user(opt_out.as_deref(), tunables.as_deref()) {
            MallocTuning::LeftToUser
        } else {
            MallocTuning::Set
        };
        assert_eq!(keep_freed_memory(), expected);
        assert_eq!(
            keep_freed_memory(),
            expected,
            "a second call changes nothing"
        );
        if expected != MallocTuning::Set {
            return; // the user's own malloc settings decide what happens to it
        }
        // Under glibc's defaults this size is mmapped and unmapped on free.
        const SIZE: usize = 16 << 20;
        // SAFETY: mallinfo2 only reads malloc's statistics (all arenas).
        let stats = || unsafe { libc::mallinfo2() };
        let before = stats();
        // SAFETY: a plain malloc/free pair, written so it is really in use;
        // black_box keeps the compiler from eliding the pair.
        let (during, after) = unsafe {
            let p = std::hint::black_box(libc::malloc(SIZE)).cast::<u8>();
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 1, SIZE);
            std::hint::black_box(p); // and the writes, before the free
            let during = stats();
            libc::free(p.cast());
            (during, stats())
        };
        assert!(
            during.hblkhd < before.hblkhd + SIZE,
            "served by a fresh mapping: {} mapped bytes before, {} during",
            before.hblkhd,
            during.hblkhd
        );
        assert!(
            after.fordblks >= SIZE,
            "the freed block left the heap: {} free bytes after",
            after.fordblks
        );
    }

    /// The resident size of this process, from /proc/self/statm.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("statm's second field");
        // SAFETY: sysconf only reads a constant.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
    }

    /// A freed block below a live one, as an old version's weights lie below
    /// its replacement's after a hot swap, leaves the RSS once a
    /// `ReleaseOnDrop` goes. (The free top of a thread's arena is not
    /// returned by `malloc_trim`; a block in the middle is.)
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn dropping_the_guard_returns_kept_memory() {
        let Some(guard) = ReleaseOnDrop::if_kept() else {
            let opt_out = std::env::var(OPT_OUT).ok();
            let tunables = std::env::var("GLIBC_TUNABLES").ok();
            assert!(left_to_user(opt_out.as_deref(), tunables.as_deref()));
            return; // malloc returns memory by itself then
        };
        // Under 64 MiB, the most a thread arena's heap can hold.
        const SIZE: usize = 32 << 20;
        // SAFETY: as in freed_blocks_stay_in_the_heap.
        let (kept, above) = unsafe {
            let p = std::hint::black_box(libc::malloc(SIZE)).cast::<u8>();
            let above = std::hint::black_box(libc::malloc(1 << 20));
            assert!(!p.is_null() && !above.is_null());
            std::ptr::write_bytes(p, 1, SIZE);
            std::hint::black_box(p); // and the writes, before the free
            libc::free(p.cast());
            (rss_bytes(), above)
        };
        drop(guard);
        let released = rss_bytes();
        // SAFETY: allocated above and not freed yet.
        unsafe { libc::free(above) };
        assert!(
            released + SIZE / 2 < kept,
            "RSS {kept} bytes with the freed block kept, {released} after the guard went"
        );
    }
}
