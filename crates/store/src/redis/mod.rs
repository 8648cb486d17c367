//! The location service in Redis (`REDIS_URL`), shared by several careflow-sip nodes: a device
//! registered through node A is found by node B.
//!
//! One key per address-of-record (`careflow:loc:AOR`) holding its bindings as JSON, expiring
//! with the last of them. An update reads the key, applies the registrar's decision, and
//! writes back only if the key still holds what was read (a compare-and-set in a Lua script),
//! retrying on a race; so two nodes handling REGISTERs for one user never lose a binding.
//! The connection manager reconnects by itself after a Redis restart or outage; meanwhile
//! updates fail (REGISTER gets 503) and devices re-register on their next refresh. Every
//! command has a deadline, and a command that misses it has a fresh connection manager built
//! in the background: the manager's own reconnection was seen to stall for good after an
//! outage, leaving every later command waiting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use careflow_core::registrar::{Outcome, Reject};
use careflow_core::{Binding, Transport};
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::{LocationStore, StoreError, UpdateFn};

pub mod bus;
mod conn;
pub mod links;
pub mod nodes;

pub use conn::Redis;

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
    redis: Redis,
    /// Updates of one AoR from this node run one at a time (striped by AoR), so the
    /// compare-and-set only ever races with other nodes: twenty phones of one user registering
    /// at once through one node must not exhaust its retries.
    update_locks: Vec<tokio::sync::Mutex<()>>,
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

/// Stripes of the per-AoR update lock.
const UPDATE_STRIPES: usize = 64;

/// Where a binding of another process lives: its process and connection, kept as they were
/// when this process rewrites the AoR (only that process can use them).
type Foreign = HashMap<(u64, String), (Value, Value)>;

impl RedisLocation {
    /// Connects (`redis://HOST:PORT[/DB]`); `node` names this process.
    pub async fn open(url: &str, node: String) -> Result<Self, StoreError> {
        Ok(Self::over(Redis::open(url).await?, node))
    }

    /// The location service on a Redis connection shared with other users of it.
    pub fn over(redis: Redis, node: String) -> Self {
        Self {
            redis,
            update_locks: (0..UPDATE_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            cas: redis::Script::new(CAS),
            node,
            count: AtomicUsize::new(0),
        }
    }

    fn encode(&self, bindings: &[Binding], foreign: &Foreign) -> String {
        let list: Vec<Value> = bindings
            .iter()
            .map(|b| {
                // The connection only means something on the node that holds it.
                let (node, conn) = if b.here {
                    (json!(self.node), json!(b.conn))
                } else {
                    foreign
                        .get(&(b.id, b.contact.clone()))
                        .cloned()
                        .unwrap_or((Value::Null, Value::Null))
                };
                json!({
                    "id": b.id, "aor": b.aor, "contact": b.contact, "callId": b.call_id,
                    "cseq": b.cseq, "expiresAt": b.expires_at, "registeredAt": b.registered_at,
                    "q": b.q, "instance": b.instance, "regId": b.reg_id,
                    "transport": b.transport.as_str(), "source": b.source.to_string(),
                    "userAgent": b.user_agent, "path": b.path, "owner": b.owner,
                    "conn": conn, "node": node,
                })
            })
            .collect();
        Value::Array(list).to_string()
    }

    /// The bindings in `text`, and where those of other processes live.
    fn decode(&self, text: &str) -> (Vec<Binding>, Foreign) {
        let Ok(Value::Array(list)) = serde_json::from_str::<Value>(text) else {
            tracing::warn!("unreadable bindings in redis; ignoring them");
            return Default::default();
        };
        let mut foreign = Foreign::new();
        let bindings = list
            .iter()
            .filter_map(|v| {
                let b = self.binding(v)?;
                if !b.here {
                    let field = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
                    foreign.insert((b.id, b.contact.clone()), (field("node"), field("conn")));
                }
                Some(b)
            })
            .collect();
        (bindings, foreign)
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
            owner: s("owner"),
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
}

#[async_trait]
impl LocationStore for RedisLocation {
    async fn update(
        &self,
        aor: &str,
        decide: UpdateFn<'_>,
    ) -> Result<Result<Outcome, Reject>, StoreError> {
        let key = format!("{PREFIX}{aor}");
        let stripe = {
            use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
            BuildHasherDefault::<DefaultHasher>::default().hash_one(aor) as usize % UPDATE_STRIPES
        };
        let _one_at_a_time = self.update_locks[stripe].lock().await;
        let mut conn = self.redis.conn();
        for attempt in 0..16u64 {
            if attempt > 0 {
                // Another node won the race: let it finish before reading again.
                tokio::time::sleep(Duration::from_millis(1 + attempt % 4)).await;
            }
            let old: Option<String> = self.redis.within(conn.get(&key)).await?;
            let old = old.unwrap_or_default();
            let (current, foreign) = if old.is_empty() {
                Default::default()
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
                self.encode(&outcome.bindings, &foreign)
            };
            let expiry_ms = outcome
                .bindings
                .iter()
                .map(|b| b.expires_at)
                .max()
                .unwrap_or(0)
                .saturating_mul(1000);
            let done: i64 = self
                .redis
                .within(
                    self.cas
                        .key(&key)
                        .arg(&old)
                        .arg(&new)
                        .arg(expiry_ms)
                        .invoke_async(&mut conn),
                )
                .await?;
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
        // Contention between nodes: a later attempt can succeed.
        Err(StoreError::unavailable(
            "redis",
            format!("{aor} changed too often to update"),
        ))
    }

    async fn lookup(&self, aor: &str, now: u64) -> Result<Vec<Binding>, StoreError> {
        let mut conn = self.redis.conn();
        let v: Option<String> = self
            .redis
            .within(conn.get(format!("{PREFIX}{aor}")))
            .await?;
        Ok(v.map(|t| self.decode(&t).0)
            .unwrap_or_default()
            .into_iter()
            .filter(|b| b.expires_at > now)
            .collect())
    }

    async fn all(&self, now: u64) -> Result<Vec<Binding>, StoreError> {
        let keys = self.redis.scan(&format!("{PREFIX}*")).await?;
        let mut conn = self.redis.conn();
        let mut out = Vec::new();
        for chunk in keys.chunks(500) {
            let values: Vec<Option<String>> = self
                .redis
                .within(redis::cmd("MGET").arg(chunk).query_async(&mut conn))
                .await?;
            for v in values.into_iter().flatten() {
                out.extend(self.decode(&v).0.into_iter().filter(|b| b.expires_at > now));
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
