//! [`WokenOnly`]: futures a hot task polls only after they woke it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Holds what a task waits on rarely (timers, shutdown, faults) beside what wakes it often,
/// and polls it only after it woke the task: a map stream's body is polled twice per delta
/// and a connection's task on every frame, and polling the rare waits each time cost more
/// than the stream's own work on a delta. Written by hand: `FuturesUnordered` polls only what
/// was woken too, but holds futures of one type that end once; these are re-armed in place.
pub(crate) struct WokenOnly<T> {
    wake: Arc<Flag>,
    inner: T,
}

/// The waker the inner futures get: notes the wake, then passes it on to the task.
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<T> WokenOnly<T> {
    pub(crate) fn new(inner: T) -> Self {
        WokenOnly { wake: Arc::new(Flag { woken: AtomicBool::new(true), task: AtomicWaker::new() }), inner }
    }

    /// The inner futures, to re-arm one; call [`WokenOnly::rearmed`] after.
    pub(crate) fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Has the next poll look at the inner futures (one was replaced or reset).
    pub(crate) fn rearmed(&self) {
        self.wake.woken.store(true, Ordering::Release);
    }

    /// Runs `poll` on the inner futures, with a waker of their own, if one of them woke the
    /// task since the last time; `Pending` without running it otherwise. After `Ready` the
    /// next call runs it again (another may be ready too).
    pub(crate) fn poll_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut T, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.wake.task.register(cx.waker());
        if !self.wake.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.wake.clone());
        let r = poll(&mut self.inner, &mut Context::from_waker(&waker));
        if r.is_ready() {
            self.rearmed();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;

    /// A future that counts its polls and is ready once its sender fired.
    struct Counted {
        polls: Arc<AtomicUsize>,
        rx: tokio::sync::oneshot::Receiver<()>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            std::pin::Pin::new(&mut self.rx).poll(cx).map(|_| ())
        }
    }

    #[tokio::test]
    async fn polls_the_inner_future_only_after_it_woke_the_task() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut w = WokenOnly::new(Counted { polls: polls.clone(), rx });
        let poll = |w: &mut WokenOnly<Counted>| {
            let waker = futures_util::task::noop_waker();
            w.poll_with(&mut Context::from_waker(&waker), |f, cx| std::pin::Pin::new(f).poll(cx))
        };
        // The first poll registers the inner future; later ones leave it alone.
        for _ in 0..5 {
            assert!(poll(&mut w).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Re-armed: looked at once more.
        w.rearmed();
        assert!(poll(&mut w).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        // Its wake gets it polled, and it is ready.
        tx.send(()).unwrap();
        assert!(poll(&mut w).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn the_task_is_woken_through_it() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut w = WokenOnly::new(rx);
        let task = tokio::spawn(async move {
            std::future::poll_fn(|cx| w.poll_with(cx, |rx, cx| std::pin::Pin::new(rx).poll(cx))).await.is_ok()
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        tx.send(()).unwrap();
        let done = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        assert!(done.expect("the task was woken").unwrap());
    }
}
