//! Idle memory of the long-running node (`citadel up`): glibc's per-thread malloc arenas and
//! the heap freed by start-up.

/// Allocator settings, before any thread starts: at most two malloc arenas (glibc creates
/// up to eight per core, each keeping its own free memory) — the main thread's and one the
/// runtime's workers share.
pub fn at_start() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Once the node is up: returns the heap freed by start-up to the kernel. (The executable's
/// code pages stay mapped: dropping them would only lower the figure until the idle node
/// touches them again, which it does within seconds.)
pub fn after_start() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
