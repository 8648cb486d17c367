//! One-time tokens in Redis (`careflow:link:TOKEN`), so a provisioning link made through one
//! node works through any: GETDEL makes each usable once, the key's lifetime bounds it.

use std::time::Duration;

use super::Redis;
use crate::StoreError;

const PREFIX: &str = "careflow:link:";

/// One-time links shared by the nodes.
#[derive(Debug, Clone)]
pub struct SharedLinks {
    redis: Redis,
}

impl SharedLinks {
    /// The links on a Redis connection.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// Stores `token` → `value` for `ttl`.
    pub async fn put(&self, token: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.redis.conn();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.redis
            .within(
                redis::cmd("SET")
                    .arg(format!("{PREFIX}{token}"))
                    .arg(value)
                    .arg("PX")
                    .arg(ms)
                    .query_async::<()>(&mut conn),
            )
            .await
    }

    /// The value of a live `token`, which is used up by this call (atomically: two nodes
    /// serving the same link at once hand it out once).
    pub async fn take(&self, token: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.redis.conn();
        self.redis
            .within(
                redis::cmd("GETDEL")
                    .arg(format!("{PREFIX}{token}"))
                    .query_async::<Option<String>>(&mut conn),
            )
            .await
    }
}
