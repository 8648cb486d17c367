//! The cluster's liveness keys in the real Redis (database 15): what a node announces is read
//! by the others, expires unless refreshed, and a clean shutdown removes only its own epoch's.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use careflow_core::cluster::{Announcement, NodeId};
use careflow_store::redis::Redis;
use careflow_store::redis::nodes::NodeKeys;

fn node(id: u64, epoch: u64) -> Announcement {
    Announcement {
        node: NodeId(id),
        epoch,
        address: format!("10.9.0.{}:5090", id % 250),
    }
}

fn has(read: &[Announcement], a: &Announcement) -> bool {
    read.contains(a)
}

#[tokio::test]
async fn announced_nodes_are_read_expire_and_withdraw_only_their_own_epoch() {
    let redis = Redis::open("redis://127.0.0.1:6379/15")
        .await
        .expect("Redis on 127.0.0.1:6379 (run scripts/ensure-services)");
    let keys = NodeKeys::new(redis);
    // Ids of their own per run (the database is shared with other tests).
    let base = u64::from(std::process::id()) << 16;
    let (one, two) = (node(base + 1, 1_000), node(base + 2, 2_000));
    keys.announce(&one, Duration::from_secs(10)).await.unwrap();
    keys.announce(&two, Duration::from_millis(300))
        .await
        .unwrap();
    let read = keys.read().await.unwrap();
    assert!(has(&read, &one) && has(&read, &two), "{read:?}");

    // Node two stops refreshing: its key is gone once its lifetime is over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read = keys.read().await.unwrap();
    assert!(has(&read, &one) && !has(&read, &two), "{read:?}");

    // Node one restarts (a new epoch) before the old process's shutdown removes its key:
    // the old process must not remove the new one's.
    let reborn = node(base + 1, 1_001);
    keys.announce(&reborn, Duration::from_secs(10))
        .await
        .unwrap();
    keys.withdraw(&one).await.unwrap();
    assert!(has(&keys.read().await.unwrap(), &reborn));
    keys.withdraw(&reborn).await.unwrap();
    let read = keys.read().await.unwrap();
    assert!(read.iter().all(|a| a.node != reborn.node), "{read:?}");
}
