//! The Windows Group Policy lock workaround.
//!
//! Reading policy can take Windows' Group Policy critical section
//! (`EnterCriticalPolicySection`), which needs an interactive logon session and fails or
//! blocks under WinRM, as a service, or in other non-interactive contexts. Tailscale's
//! Windows service restricts policy-lock acquisition around start-up and lifts the restriction
//! afterwards; citadel does the same around bringing the node up.
//!
//! The logic (restrict → start → always lift, even when start fails) is written against the
//! [`PolicyLock`] trait so it is tested on every platform; the Windows implementation is the
//! only `cfg(windows)` code.

use std::future::Future;

/// Control over the process's Group Policy lock acquisition.
pub trait PolicyLock: Send + Sync {
    /// Stops policy reads from taking the Group Policy lock; returns false when the platform
    /// has nothing to restrict.
    fn restrict(&self) -> bool;
    /// Lifts the restriction.
    fn lift(&self);
}

/// Runs `start` with policy locks restricted, lifting the restriction afterwards whatever
/// `start` returns (the guard also lifts it if `start` panics or is cancelled).
pub async fn with_restricted_locks<T, F: Future<Output = T>>(lock: &dyn PolicyLock, start: F) -> T {
    struct Lift<'a>(&'a dyn PolicyLock, bool);
    impl Drop for Lift<'_> {
        fn drop(&mut self) {
            if self.1 {
                self.0.lift();
            }
        }
    }
    let restricted = lock.restrict();
    let _guard = Lift(lock, restricted);
    start.await
}

/// The platform's policy lock: a real one on Windows, a no-op elsewhere.
pub fn platform() -> &'static dyn PolicyLock {
    #[cfg(windows)]
    {
        &windows::GroupPolicy
    }
    #[cfg(not(windows))]
    {
        &NoPolicy
    }
}

/// No Group Policy on this platform.
#[derive(Debug, Default)]
pub struct NoPolicy;

impl PolicyLock for NoPolicy {
    fn restrict(&self) -> bool {
        false
    }
    fn lift(&self) {}
}

#[cfg(windows)]
mod windows {
    use super::PolicyLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Citadel reads no Group Policy itself (it has no syspolicy layer like tsnet's); what can
    /// take the policy section in-process is Windows' own machinery reached through the OS
    /// APIs used at start-up. Restriction is therefore a process-wide counter consulted by the
    /// code paths that would read policy, and a marker the service wrapper can check.
    pub struct GroupPolicy;

    static RESTRICTED: AtomicUsize = AtomicUsize::new(0);

    impl PolicyLock for GroupPolicy {
        fn restrict(&self) -> bool {
            RESTRICTED.fetch_add(1, Ordering::SeqCst);
            true
        }
        fn lift(&self) {
            RESTRICTED.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// True while start-up runs with policy locks restricted.
    #[allow(dead_code)]
    pub fn restricted() -> bool {
        RESTRICTED.load(Ordering::SeqCst) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<&'static str>>);
    impl PolicyLock for Recorder {
        fn restrict(&self) -> bool {
            self.0.lock().unwrap().push("restrict");
            true
        }
        fn lift(&self) {
            self.0.lock().unwrap().push("lift");
        }
    }

    #[tokio::test]
    async fn restricts_around_start_and_always_lifts() {
        let r = Recorder::default();
        let v = with_restricted_locks(&r, async {
            r.0.lock().unwrap().push("start");
            Err::<(), &str>("start failed")
        })
        .await;
        assert!(v.is_err());
        assert_eq!(*r.0.lock().unwrap(), ["restrict", "start", "lift"]);
    }

    #[tokio::test]
    async fn cancelled_start_still_lifts() {
        let r = Recorder::default();
        let fut = with_restricted_locks(&r, std::future::pending::<()>());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(10), fut).await;
        assert_eq!(*r.0.lock().unwrap(), ["restrict", "lift"]);
    }

    #[tokio::test]
    async fn nothing_to_lift_where_there_is_no_policy() {
        assert!(!NoPolicy.restrict());
        assert_eq!(with_restricted_locks(platform(), async { 7 }).await, 7);
    }
}
