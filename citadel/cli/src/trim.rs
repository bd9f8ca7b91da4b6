//! Idle memory of the long-running node (`citadel up`): most of its resident set is its own
//! code, mapped in 64 KiB runs (the kernel's fault-around) while it starts, and glibc's
//! per-thread malloc arenas.

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

/// Once the node is up: returns the heap freed by start-up to the kernel and unmaps the
/// executable's code pages, so only the code the idle node runs is faulted back in.
pub fn after_start() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    #[cfg(target_os = "linux")]
    release_code_pages();
}

/// Drops this process's mappings of its executable's code pages (they stay in the page
/// cache; the next call into them maps them again). Only the read-only, executable segments
/// of the executable itself: never written, so nothing is lost.
#[cfg(target_os = "linux")]
fn release_code_pages() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else { return };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        // address perms offset dev inode path
        if f.len() < 6 || f[1] != "r-xp" || std::path::Path::new(f[5]) != exe {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else { continue };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else { continue };
        // SAFETY: MADV_DONTNEED on a private, read-only file mapping that was never written
        // only drops page-table entries; later accesses fault the file's pages back in.
        let r = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
        if r != 0 {
            tracing::debug!("madvise on the code mapping failed: {}", std::io::Error::last_os_error());
        }
    }
}
