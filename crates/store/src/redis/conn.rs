//! One Redis connection shared by the location service and the cluster's liveness keys: a
//! multiplexed connection manager, a deadline on every command, and a rebuild of the manager
//! when a command misses it (its own reconnection was seen to stall for good after an outage,
//! leaving every later command waiting).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::StoreError;

/// Longest wait for one Redis command: a call must fail over to 503 rather than wait.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(3))
        .set_response_timeout(COMMAND_TIMEOUT)
        .set_number_of_retries(2)
}

pub(crate) fn redis_err(e: redis::RedisError) -> StoreError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::unavailable("redis", e)
    } else {
        StoreError::backend("redis", e)
    }
}

/// A Redis server, reconnected in the background when it stalls.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    /// Replaced whole when it stalls (see [`Self::within`]).
    conn: Arc<RwLock<ConnectionManager>>,
    rebuilding: Arc<AtomicBool>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects (`redis://HOST:PORT[/DB]`).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Invalid(format!("REDIS_URL: {e}")))?;
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client.clone(), manager_config()),
        )
        .await
        .map_err(|_| StoreError::unavailable("redis", "connection timed out"))?
        .map_err(redis_err)?;
        Ok(Self {
            client,
            conn: Arc::new(RwLock::new(conn)),
            rebuilding: Arc::default(),
        })
    }

    /// The client (for connections of their own, such as pub/sub).
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The current connection manager (cheap to clone; commands are multiplexed).
    pub(crate) fn conn(&self) -> ConnectionManager {
        match self.conn.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Runs one Redis command within [`COMMAND_TIMEOUT`]; one that misses it has the
    /// connection manager rebuilt in the background.
    pub(crate) async fn within<T>(
        &self,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
            Ok(r) => r.map_err(redis_err),
            Err(_) => {
                self.rebuild();
                Err(StoreError::unavailable(
                    "redis",
                    format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
                ))
            }
        }
    }

    /// Every key matching `pattern`, by SCAN (never KEYS: it blocks the server).
    pub(crate) async fn scan(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .within(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// Builds a new connection manager (retrying every second until Redis answers) and swaps
    /// it in; one rebuild at a time.
    fn rebuild(&self) {
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        let (client, slot, flag) = (
            self.client.clone(),
            self.conn.clone(),
            self.rebuilding.clone(),
        );
        tokio::spawn(async move {
            loop {
                let fresh = tokio::time::timeout(
                    Duration::from_secs(5),
                    ConnectionManager::new_with_config(client.clone(), manager_config()),
                )
                .await;
                match fresh {
                    Ok(Ok(c)) => {
                        match slot.write() {
                            Ok(mut s) => *s = c,
                            Err(p) => *p.into_inner() = c,
                        }
                        tracing::info!("redis connection re-established");
                        break;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "redis still unavailable; retrying"),
                    Err(_) => tracing::warn!("redis still not answering; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            flag.store(false, Ordering::Release);
        });
    }
}
