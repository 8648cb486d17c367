//! Graceful shutdown. On SIGTERM the server drains: new out-of-dialog requests get 503 with
//! Retry-After (clients go to another node or come back), in-dialog requests, CANCELs and ACKs
//! still pass so calls can end, requests being handled finish (a REGISTER being written is
//! written), and calls being set up get until the grace period ends to be answered; then their
//! branches are CANCELled and their callers answered 503. Only then do the listeners close.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use careflow_proto::{Message, Method};

use crate::app::{App, Ctx};

/// Counts a request being handled in a spawned task; dropping it ends the count.
pub(crate) struct InFlight(Arc<App>);

impl InFlight {
    pub(crate) fn new(app: &Arc<App>) -> Self {
        app.inflight.fetch_add(1, Ordering::AcqRel);
        Self(app.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handles a request on the calling task as far as it goes without waiting, and the rest (if
/// any) in a task of its own; counted for the drain either way.
///
/// With the embedded stores a call's routing never waits, and a REGISTER only for the journal
/// write that makes its binding durable; a task per request cost a spawn, a schedule, moves of
/// the ~1 KiB message and (for REGISTER) its checks done twice, once to answer challenges
/// without a task and once in it (issue 22). A network store, DNS or rtpengine makes the
/// future wait: it is then spawned where it stands. `work` is moved (copied) here and into a
/// box: a caller with a large state machine boxes it inside `work`.
pub(crate) fn handle_now_or_in_task<F>(app: &Arc<App>, work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let busy = InFlight::new(app);
    run_now_or_spawn(async move {
        work.await;
        drop(busy);
    });
}

/// Polls `fut` once here, with a no-op waker, and spawns it if it is pending. Nothing that
/// becomes ready in between is missed: tokio polls a new task at once, and that poll
/// registers the task's own waker. A panic ends only this piece of work, as it would end a
/// task, not the receive loop that called.
fn run_now_or_spawn<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    // Boxed so that the pinned future keeps its address when it moves into a task.
    let mut task = Box::pin(fut);
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        task.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }));
    match polled {
        Ok(std::task::Poll::Ready(())) => {}
        Ok(std::task::Poll::Pending) => {
            tokio::spawn(task);
        }
        Err(_) => tracing::error!("handling a request panicked; that request is dropped"),
    }
}

impl App {
    /// Whether the server is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// While draining, a new out-of-dialog request is refused with 503 (true: it was).
    pub(crate) fn refuse_while_draining(&self, msg: &Message, ctx: &Ctx) -> bool {
        if !self.draining() || msg.to_tag().is_some() {
            return false;
        }
        if matches!(msg.method(), Method::Cancel | Method::Ack) {
            return false;
        }
        let resp = self
            .reply(msg, ctx, 503)
            .reason("Shutting Down")
            .header("Retry-After", 5)
            .build();
        self.metrics.response(503);
        if msg.method() == Method::Invite {
            // Like the proxy's other local INVITE answers: stateless, the ACK is absorbed.
            self.send_back(msg, ctx, resp);
        } else {
            self.send_response(msg, ctx, 503, resp);
        }
        true
    }

    /// Drains: see the module comment. Returns once nothing is in progress (or the grace
    /// period is over and what was left has been answered).
    pub async fn drain(self: &Arc<Self>, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        if let Some(c) = &self.cluster {
            // The other nodes stop sending us calls for our devices now, not when our key
            // expires.
            c.leave().await;
        }
        let deadline = Instant::now() + grace;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "draining: new requests get 503; finishing requests and calls in progress"
        );
        loop {
            let inflight = self.inflight.load(Ordering::Acquire);
            let pending = self.pending_forwards();
            if inflight == 0 && pending == 0 {
                tracing::info!("drained: nothing in progress");
                return;
            }
            if Instant::now() >= deadline {
                let n = self.give_up_pending();
                tracing::warn!(
                    calls = n,
                    requests = inflight,
                    "grace period over: unanswered calls were cancelled and their callers answered 503"
                );
                // Let the CANCELs and final responses leave, and the handlers finish writing.
                let until = Instant::now() + Duration::from_secs(2);
                while self.inflight.load(Ordering::Acquire) > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::run_now_or_spawn;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn work_that_need_not_wait_is_done_before_the_call_returns() {
        let done = Arc::new(AtomicU32::new(0));
        let d = done.clone();
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        run_now_or_spawn(async move {
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            tasks,
            "no task was spawned"
        );
    }

    #[tokio::test]
    async fn a_panic_ends_the_work_not_the_caller() {
        let dropped = Arc::new(AtomicU32::new(0));
        struct Guard(Arc<AtomicU32>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let g = Guard(dropped.clone());
        run_now_or_spawn(async move {
            let _g = g;
            panic!("a bug in one request's handling");
        });
        // Still here; what the work held was released (the drain count is such a guard).
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn work_that_waits_finishes_in_a_task_even_when_woken_before_the_task_first_runs() {
        let done = Arc::new(AtomicU32::new(0));
        // Woken at once, while only the no-op waker is registered: the task's first poll
        // must see it.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let notify = Arc::new(tokio::sync::Notify::new());
        let (d, n) = (done.clone(), notify.clone());
        run_now_or_spawn(async move {
            d.fetch_add(1, Ordering::SeqCst);
            let _ = rx.await;
            n.notified().await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "ran up to its first wait here"
        );
        tx.send(()).unwrap();
        notify.notify_one();
        tokio::time::timeout(Duration::from_secs(5), async {
            while done.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the spawned rest of the work finished");
    }
}
