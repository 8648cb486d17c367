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
/// With the embedded stores a REGISTER or a call's routing never waits, and a task per request
/// cost a spawn, a schedule, moves of the ~1 KiB message and (for REGISTER) its checks done
/// twice, once to answer challenges without a task and once in it (issue 22). A network store
/// or DNS makes the future wait: it is then spawned where it stands. The first poll uses a
/// no-op waker; tokio polls a spawned task once at once, which registers the task's own
/// waker, so nothing that became ready in between is missed. `work` is moved (copied) here and
/// into the box: a caller with a large state machine boxes it inside `work`.
pub(crate) fn handle_now_or_in_task<F>(app: &Arc<App>, work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let busy = InFlight::new(app);
    // Boxed so that the pinned future keeps its address when it moves into a task.
    let mut task = Box::pin(async move {
        work.await;
        drop(busy);
    });
    if task
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
    {
        tokio::spawn(task);
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
