//! Redis pub/sub between the nodes of a cluster: announcements that let the others act at
//! once (a node going down, a ban). Best effort by design: a message published while a node is
//! disconnected is lost to it, so nothing may depend on one arriving (liveness rests on the
//! expiring keys; a missed ban is made again where the source misbehaves).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::Redis;
use crate::StoreError;

/// Publishes to and subscribes to channels.
#[derive(Debug, Clone)]
pub struct Bus {
    redis: Redis,
    /// Channels are global to a Redis server while keys are per database: every channel is
    /// named after the database, so clusters on other databases of one server never hear us.
    prefix: String,
}

/// Messages waiting for the subscriber before new ones are dropped (a slow consumer must not
/// grow memory without bound).
const BACKLOG: usize = 1024;

impl Bus {
    /// The bus on a Redis connection.
    pub fn new(redis: Redis) -> Self {
        let db = redis.client().get_connection_info().redis.db;
        Self {
            redis,
            prefix: format!("careflow:{db}:"),
        }
    }

    /// Publishes `payload` on `channel` (of this database).
    pub async fn publish(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        let mut conn = self.redis.conn();
        self.redis
            .within(
                redis::cmd("PUBLISH")
                    .arg(format!("{}{channel}", self.prefix))
                    .arg(payload)
                    .query_async::<i64>(&mut conn),
            )
            .await
            .map(|_| ())
    }

    /// The payloads published on `channels` from now on, as (channel, payload). A task keeps
    /// the subscription, reconnecting after a Redis outage; it ends when the receiver is
    /// dropped.
    pub fn subscribe(&self, channels: &[&str]) -> mpsc::Receiver<(String, String)> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let client = self.redis.client().clone();
        let prefix = self.prefix.clone();
        let channels: Vec<String> = channels.iter().map(|c| format!("{prefix}{c}")).collect();
        tokio::spawn(async move {
            let mut down = false;
            while !tx.is_closed() {
                let subscribed = async {
                    let mut ps = client.get_async_pubsub().await?;
                    for c in &channels {
                        ps.subscribe(c).await?;
                    }
                    Ok::<_, redis::RedisError>(ps)
                };
                let ps = match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
                    Ok(Ok(ps)) => ps,
                    Ok(Err(e)) => {
                        if !down {
                            tracing::warn!(error = %e, "redis pub/sub unavailable; retrying");
                            down = true;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if down {
                    tracing::info!("redis pub/sub subscribed again");
                    down = false;
                }
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    let Some(channel) = msg.get_channel_name().strip_prefix(&prefix) else {
                        continue;
                    };
                    let channel = channel.to_string();
                    match tx.try_send((channel, payload)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::warn!(
                                "cluster announcements arrive faster than handled; one dropped"
                            );
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                // The connection ended (Redis restarted or went away): subscribe again.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        rx
    }
}
