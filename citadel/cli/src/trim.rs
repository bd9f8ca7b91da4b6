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

/// Longest wait for the data plane to settle before the start-up heap is trimmed anyway.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// True once start-up's work is done: the network probed and the home DERP region connected
/// (the endpoint report to Nexus follows right away).
pub fn settled(ni: &citadel::dataplane::NetInfo) -> bool {
    ni.report.is_some() && ni.preferred_derp != 0 && ni.derp_connected.contains(&ni.preferred_derp)
}

/// Waits until the data plane has [`settled`] (at most [`SETTLE_LIMIT`]; at once without a
/// data plane), then runs [`after_start`].
pub async fn after_settled(net_info: Option<tokio::sync::watch::Receiver<citadel::dataplane::NetInfo>>) {
    if let Some(mut ni) = net_info {
        let _ = tokio::time::timeout(SETTLE_LIMIT, ni.wait_for(settled)).await;
        // The control loop reports the endpoints on the same change: let it run first.
        tokio::task::yield_now().await;
    }
    after_start();
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

#[cfg(test)]
mod tests {
    use super::*;
    use citadel::dataplane::NetInfo;

    #[test]
    fn settled_needs_a_probe_and_a_connected_home_region() {
        let mut ni = NetInfo::default();
        assert!(!settled(&ni));
        ni.report = Some(Default::default());
        ni.preferred_derp = 2;
        assert!(!settled(&ni), "home picked but not connected");
        ni.derp_connected = vec![1, 2];
        assert!(settled(&ni));
    }
}
