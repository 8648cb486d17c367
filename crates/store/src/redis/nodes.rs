//! The cluster's liveness keys: `careflow:node:ID` holds a node's internal-link address and
//! boot epoch and expires unless the node keeps refreshing it. What the keys say is fed to
//! `careflow_core::cluster::Membership`, which draws the conclusions.

use std::time::Duration;

use careflow_core::cluster::{Announcement, NodeId};
use serde_json::{Value, json};

use super::Redis;
use crate::StoreError;

const PREFIX: &str = "careflow:node:";

/// The pub/sub channel of node starts and stops.
pub const CHANNEL: &str = "nodes";

/// A node announcing a change of its life on [`CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// It started (in this epoch).
    Up(Announcement),
    /// It is stopping (this epoch ends).
    Down(Announcement),
}

impl NodeEvent {
    /// The message published.
    pub fn encode(&self) -> String {
        let (kind, a) = match self {
            Self::Up(a) => ("up", a),
            Self::Down(a) => ("down", a),
        };
        json!({
            "event": kind, "node": a.node.to_string(),
            "address": a.address, "epoch": a.epoch.to_string(),
        })
        .to_string()
    }

    /// A message read back; `None` for anything else.
    pub fn parse(payload: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(payload).ok()?;
        let a = Announcement {
            node: v.get("node")?.as_str()?.parse().ok()?,
            epoch: v.get("epoch")?.as_str()?.parse().ok()?,
            address: v.get("address")?.as_str()?.to_string(),
        };
        match v.get("event")?.as_str()? {
            "up" => Some(Self::Up(a)),
            "down" => Some(Self::Down(a)),
            _ => None,
        }
    }
}

/// KEYS[1] = key, ARGV[1] = the epoch that may be deleted: a node going down removes its own
/// key, never the one a newer start of it wrote.
const WITHDRAW: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false then return 0 end
local ok, v = pcall(cjson.decode, cur)
if ok and v['epoch'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The liveness keys of every node.
#[derive(Debug, Clone)]
pub struct NodeKeys {
    redis: Redis,
}

fn key(node: NodeId) -> String {
    format!("{PREFIX}{node}")
}

impl NodeKeys {
    /// The keys on a Redis connection.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// Writes (or refreshes) this node's key, to expire after `ttl` unless refreshed.
    pub async fn announce(&self, me: &Announcement, ttl: Duration) -> Result<(), StoreError> {
        let value = encode(me);
        let mut conn = self.redis.conn();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.redis
            .within(
                redis::cmd("SET")
                    .arg(key(me.node))
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut conn),
            )
            .await
    }

    /// Every node's key as it is now. Unreadable keys are skipped (and logged): they name no
    /// node we could reach.
    pub async fn read(&self) -> Result<Vec<Announcement>, StoreError> {
        let keys = self.redis.scan(&format!("{PREFIX}*")).await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.redis.conn();
        let values: Vec<Option<String>> = self
            .redis
            .within(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
            .await?;
        let mut out = Vec::with_capacity(keys.len());
        for (k, v) in keys.iter().zip(values) {
            // A key that expired between SCAN and MGET: that node is not live.
            let Some(v) = v else { continue };
            match parse(k, &v) {
                Some(a) => out.push(a),
                None => tracing::warn!(key = %k, "unreadable cluster node key; ignored"),
            }
        }
        Ok(out)
    }

    /// Removes this node's key (a clean shutdown), unless a newer start of it wrote it since.
    pub async fn withdraw(&self, me: &Announcement) -> Result<(), StoreError> {
        let mut conn = self.redis.conn();
        self.redis
            .within(
                redis::Script::new(WITHDRAW)
                    .key(key(me.node))
                    .arg(me.epoch.to_string())
                    .invoke_async::<i64>(&mut conn),
            )
            .await
            .map(|_| ())
    }
}

/// The epoch is a string: Lua (the withdraw script) reads JSON numbers as doubles.
fn encode(a: &Announcement) -> String {
    json!({ "address": a.address, "epoch": a.epoch.to_string() }).to_string()
}

fn parse(key: &str, value: &str) -> Option<Announcement> {
    let node: NodeId = key.strip_prefix(PREFIX)?.parse().ok()?;
    let v: Value = serde_json::from_str(value).ok()?;
    Some(Announcement {
        node,
        epoch: v.get("epoch")?.as_str()?.parse().ok()?,
        address: v.get("address")?.as_str()?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_node_and_values_round_trip() {
        let a = Announcement {
            node: NodeId(0xfeed),
            epoch: 1_796_000_000_123,
            address: "10.0.0.2:5090".into(),
        };
        let k = key(a.node);
        assert_eq!(k, "careflow:node:000000000000feed");
        let v = encode(&a);
        assert_eq!(parse(&k, &v), Some(a.clone()));
        assert_eq!(parse("careflow:node:zz", &v), None);
        assert_eq!(parse(&k, "{\"address\":1}"), None);
        for e in [NodeEvent::Up(a.clone()), NodeEvent::Down(a.clone())] {
            assert_eq!(NodeEvent::parse(&e.encode()), Some(e));
        }
        assert_eq!(NodeEvent::parse("{\"event\":\"sideways\"}"), None);
    }
}
