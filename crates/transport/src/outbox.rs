//! A connection's queue of messages for its writer: bounded, never waited on by senders, and
//! holding no memory while empty.
//!
//! Why not `tokio::sync::mpsc`: a channel allocates its first block of 32 slots (1.3 KiB for
//! our 40-byte [`Wire`]) when it is created and keeps it for its life, and almost every
//! connection is idle almost all the time (issue 22: memory per idle TLS/WSS connection). Here
//! the queue is a `VecDeque` that is released each time the writer empties it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::conn::Wire;

/// The sending side; cloned for each holder (the connection table, the reader).
#[derive(Debug)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

/// The writer's side.
#[derive(Debug)]
pub(crate) struct OutboxReader {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer: a message was queued, or the last sender went.
    wake: Notify,
    senders: AtomicUsize,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Wire>,
    /// The writer is gone: nothing queued would be written.
    closed: bool,
}

/// Why a message was not queued.
#[derive(Debug)]
pub(crate) enum NotQueued {
    /// `capacity` messages are waiting: the peer is not reading (the message is dropped).
    Full,
    /// The writer is gone; the message is given back (it may go over another connection).
    Closed(Wire),
}

/// A queue for at most `capacity` messages.
pub(crate) fn outbox(capacity: usize) -> (Outbox, OutboxReader) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        wake: Notify::new(),
        senders: AtomicUsize::new(1),
        capacity,
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReader { shared },
    )
}

impl Outbox {
    /// Queues `wire` behind what is queued, without waiting.
    pub(crate) fn try_send(&self, wire: Wire) -> Result<(), NotQueued> {
        let Ok(mut q) = self.shared.queue.lock() else {
            return Err(NotQueued::Closed(wire));
        };
        if q.closed {
            return Err(NotQueued::Closed(wire));
        }
        if q.items.len() >= self.shared.capacity {
            return Err(NotQueued::Full);
        }
        q.items.push_back(wire);
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake.notify_one();
        }
    }
}

impl OutboxReader {
    /// The next queued message; `None` once the queue is empty and every sender is gone.
    pub(crate) async fn recv(&mut self) -> Option<Wire> {
        loop {
            {
                let Ok(mut q) = self.shared.queue.lock() else {
                    return None;
                };
                if let Some(wire) = q.items.pop_front() {
                    if q.items.is_empty() {
                        q.items = VecDeque::new();
                    }
                    return Some(wire);
                }
                if self.shared.senders.load(Ordering::Acquire) == 0 {
                    return None;
                }
            }
            // A notification sent between the check above and this wait is kept as a permit
            // (`notify_one`), so it is not lost.
            self.shared.wake.notified().await;
        }
    }
}

impl OutboxReader {
    /// The next queued message if one is waiting, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Wire> {
        let mut q = self.shared.queue.lock().ok()?;
        let wire = q.items.pop_front();
        if q.items.is_empty() {
            q.items = VecDeque::new();
        }
        wire
    }
}

impl Drop for OutboxReader {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.closed = true;
            q.items = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn sip(s: &'static str) -> Wire {
        Wire::Sip(Bytes::from_static(s.as_bytes()))
    }

    fn text(w: Wire) -> Bytes {
        w.into_bytes()
    }

    #[tokio::test]
    async fn delivers_in_order_and_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = outbox(8);
        let tx2 = tx.clone();
        tx.try_send(sip("one")).unwrap();
        tx2.try_send(sip("two")).unwrap();
        assert_eq!(text(rx.recv().await.unwrap()), "one");
        drop(tx);
        assert_eq!(text(rx.recv().await.unwrap()), "two");
        // One sender left: the writer waits for it.
        let waiting = tokio::time::timeout(Duration::from_millis(30), rx.recv()).await;
        assert!(waiting.is_err());
        tx2.try_send(sip("three")).unwrap();
        drop(tx2);
        assert_eq!(text(rx.recv().await.unwrap()), "three");
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_a_message_or_by_the_last_sender_leaving() {
        let (tx, mut rx) = outbox(8);
        let writer = tokio::spawn(async move {
            let first = rx.recv().await.map(text);
            let end = rx.recv().await.is_none();
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(sip("late")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        let (first, end) = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.as_deref(), Some(&b"late"[..]));
        assert!(end);
    }

    #[test]
    fn a_full_queue_refuses_and_a_gone_writer_gives_the_message_back() {
        let (tx, rx) = outbox(2);
        tx.try_send(sip("a")).unwrap();
        tx.try_send(sip("b")).unwrap();
        assert!(matches!(tx.try_send(sip("c")), Err(NotQueued::Full)));
        drop(rx);
        assert!(
            matches!(tx.try_send(sip("d")), Err(NotQueued::Closed(w)) if matches!(&w, Wire::Sip(b) if b == "d"))
        );
    }

    #[tokio::test]
    async fn an_emptied_queue_holds_no_memory() {
        let (tx, mut rx) = outbox(8);
        for _ in 0..5 {
            tx.try_send(sip("x")).unwrap();
        }
        for _ in 0..5 {
            rx.recv().await.unwrap();
        }
        let q = rx.shared.queue.lock().unwrap();
        assert_eq!(q.items.capacity(), 0);
    }
}
