//! The location service in Redis (`REDIS_URL`), shared by several careflow-sip nodes: a device
//! registered through node A is found by node B.
//!
//! One key per address-of-record (`careflow:loc:AOR`) holding its bindings as JSON, expiring
//! with the last of them. An update reads the key, applies the registrar's decision, and
//! writes back only if the key still holds what was read (a compare-and-set in a Lua script),
//! retrying on a race; so two nodes handling REGISTERs for one user never lose a binding.
//! The connection manager reconnects by itself after a Redis restart or outage; meanwhile
//! updates fail (REGISTER gets 500/503) and devices re-register on their next refresh.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use careflow_core::registrar::{Outcome, Reject};
use careflow_core::{Binding, Transport};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use crate::{LocationStore, StoreError, UpdateFn};

const PREFIX: &str = "careflow:loc:";

/// KEYS[1] = key, ARGV[1] = expected old value ("" = absent), ARGV[2] = new value ("" =
/// delete), ARGV[3] = expiry in unix milliseconds.
const CAS: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false then cur = '' end
if cur ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
end
return 1
";

/// Bindings in Redis.
pub struct RedisLocation {
    conn: ConnectionManager,
    cas: redis::Script,
    /// Identifies this process: connection ids are only meaningful on the node holding them.
    node: String,
    count: AtomicUsize,
}

impl std::fmt::Debug for RedisLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLocation")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Database(format!("redis: {e}"))
}

impl RedisLocation {
    /// Connects (`redis://HOST:PORT[/DB]`); `node` names this process.
    pub async fn open(url: &str, node: String) -> Result<Self, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Invalid(format!("REDIS_URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_secs(3))
            .set_response_timeout(std::time::Duration::from_secs(3))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Database("redis: connection timed out".into()))?
        .map_err(redis_err)?;
        Ok(Self {
            conn,
            cas: redis::Script::new(CAS),
            node,
            count: AtomicUsize::new(0),
        })
    }

    fn encode(&self, bindings: &[Binding]) -> String {
        let list: Vec<Value> = bindings
            .iter()
            .map(|b| {
                json!({
                    "id": b.id, "aor": b.aor, "contact": b.contact, "callId": b.call_id,
                    "cseq": b.cseq, "expiresAt": b.expires_at, "registeredAt": b.registered_at,
                    "q": b.q, "instance": b.instance, "regId": b.reg_id,
                    "transport": b.transport.as_str(), "source": b.source.to_string(),
                    "userAgent": b.user_agent, "path": b.path,
                    // The connection only means something on the node that holds it.
                    "conn": b.conn, "node": self.node,
                })
            })
            .collect();
        Value::Array(list).to_string()
    }

    fn decode(&self, text: &str) -> Vec<Binding> {
        let Ok(Value::Array(list)) = serde_json::from_str::<Value>(text) else {
            tracing::warn!("unreadable bindings in redis; ignoring them");
            return Vec::new();
        };
        list.iter().filter_map(|v| self.binding(v)).collect()
    }

    fn binding(&self, v: &Value) -> Option<Binding> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        let transport: Transport = v.get("transport")?.as_str()?.parse().ok()?;
        let source: SocketAddr = v.get("source")?.as_str()?.parse().ok()?;
        let ours = v.get("node").and_then(Value::as_str) == Some(self.node.as_str());
        Some(Binding {
            id: n("id")?,
            aor: s("aor")?,
            contact: s("contact")?,
            call_id: s("callId").unwrap_or_default(),
            cseq: n("cseq").unwrap_or(0) as u32,
            expires_at: n("expiresAt")?,
            registered_at: n("registeredAt").unwrap_or(0),
            q: n("q").map(|q| q as u16),
            instance: s("instance"),
            reg_id: n("regId").map(|r| r as u32),
            transport,
            source,
            user_agent: s("userAgent"),
            conn: if ours { n("conn") } else { None },
            here: ours,
            path: v
                .get("path")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }
}

#[async_trait]
impl LocationStore for RedisLocation {
    async fn update(
        &self,
        aor: &str,
        decide: UpdateFn<'_>,
    ) -> Result<Result<Outcome, Reject>, StoreError> {
        let key = format!("{PREFIX}{aor}");
        let mut conn = self.conn.clone();
        for _ in 0..16 {
            let old: Option<String> = conn.get(&key).await.map_err(redis_err)?;
            let old = old.unwrap_or_default();
            let current = if old.is_empty() {
                Vec::new()
            } else {
                self.decode(&old)
            };
            let outcome = match decide(&current) {
                Ok(o) => o,
                Err(r) => return Ok(Err(r)),
            };
            if !outcome.changed {
                return Ok(Ok(outcome));
            }
            let new = if outcome.bindings.is_empty() {
                String::new()
            } else {
                self.encode(&outcome.bindings)
            };
            let expiry_ms = outcome
                .bindings
                .iter()
                .map(|b| b.expires_at)
                .max()
                .unwrap_or(0)
                .saturating_mul(1000);
            let done: i64 = self
                .cas
                .key(&key)
                .arg(&old)
                .arg(&new)
                .arg(expiry_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err)?;
            if done == 1 {
                // Keep the gauge current between the periodic recounts.
                let delta = outcome.bindings.len() as isize - current.len() as isize;
                let _ = self
                    .count
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                        Some(c.saturating_add_signed(delta))
                    });
                return Ok(Ok(outcome));
            }
            // Another node changed this AoR in between: decide again on what it wrote.
        }
        Err(StoreError::Database(format!(
            "redis: {aor} changed too often to update"
        )))
    }

    async fn lookup(&self, aor: &str, now: u64) -> Result<Vec<Binding>, StoreError> {
        let mut conn = self.conn.clone();
        let v: Option<String> = conn
            .get(format!("{PREFIX}{aor}"))
            .await
            .map_err(redis_err)?;
        Ok(v.map(|t| self.decode(&t))
            .unwrap_or_default()
            .into_iter()
            .filter(|b| b.expires_at > now)
            .collect())
    }

    async fn all(&self, now: u64) -> Result<Vec<Binding>, StoreError> {
        let keys = self.keys().await?;
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for chunk in keys.chunks(500) {
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            for v in values.into_iter().flatten() {
                out.extend(self.decode(&v).into_iter().filter(|b| b.expires_at > now));
            }
        }
        Ok(out)
    }

    /// Keys expire by themselves; this only refreshes the count of live bindings.
    async fn remove_expired(&self, now: u64) -> Result<usize, StoreError> {
        let n = self.all(now).await?.len();
        self.count.store(n, Ordering::Relaxed);
        Ok(0)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn shared(&self) -> bool {
        true
    }
}
