//! The state of call detail records (issue 20): the calls followed and the queue of finished
//! records to the writer. The handlers are in `cdr.rs`.

use std::sync::Mutex;
use std::time::Duration;

use careflow_core::cdr::{CallRecord, CallRecords};
use tokio::sync::mpsc;

/// Calls followed at once; beyond, new calls get no record (counted as lost).
const MAX_OPEN_CALLS: usize = 200_000;
/// Finished records waiting for the database.
const QUEUE: usize = 50_000;

/// The calls followed and the queue to the writer.
#[derive(Debug)]
pub(crate) struct Cdr {
    pub(crate) calls: Mutex<CallRecords>,
    pub(crate) queue: mpsc::Sender<CallRecord>,
    /// The writer task takes it at start.
    pub(crate) pending: Mutex<Option<mpsc::Receiver<CallRecord>>>,
}

impl Cdr {
    pub(crate) fn new(max_call: Duration) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let max_ms = u64::try_from(max_call.as_millis()).unwrap_or(u64::MAX);
        Self {
            calls: Mutex::new(CallRecords::new(max_ms, MAX_OPEN_CALLS)),
            queue,
            pending: Mutex::new(Some(rx)),
        }
    }
}
