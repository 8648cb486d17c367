//! The same behaviour from every location store: the embedded one in memory, the embedded one
//! with its journal (read back after a restart), and Redis shared by several nodes (the real
//! server, database 15, flushed first). Every check runs against each.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use careflow_core::registrar::{self, ContactValue, Outcome, RegisterRequest, Reject};
use careflow_core::{Binding, Transport};
use careflow_store::LocationStore;
use careflow_store::location::EmbeddedLocation;
use careflow_store::redis::RedisLocation;

const NOW: u64 = 1_800_000_000;
static IDS: AtomicU64 = AtomicU64::new(1);

/// A REGISTER of `contacts` for `aor` applied through the registrar, as the server does.
async fn register(
    store: &dyn LocationStore,
    aor: &str,
    contacts: &[&str],
    expires: u32,
    (call_id, cseq): (&str, u32),
    now: u64,
) -> Result<Outcome, Reject> {
    register_flow(store, aor, contacts, expires, (call_id, cseq), now, |r| r).await
}

/// [`register`] with the request adjusted by `adjust` (a connection, an owner route).
async fn register_flow(
    store: &dyn LocationStore,
    aor: &str,
    contacts: &[&str],
    expires: u32,
    (call_id, cseq): (&str, u32),
    now: u64,
    adjust: impl for<'a> FnOnce(RegisterRequest<'a>) -> RegisterRequest<'a>,
) -> Result<Outcome, Reject> {
    let contacts: Vec<ContactValue<'_>> = contacts
        .iter()
        .map(|c| ContactValue::parse(c).unwrap())
        .collect();
    let req = adjust(RegisterRequest {
        aor,
        call_id,
        cseq,
        expires: Some(expires),
        contacts,
        transport: Transport::Udp,
        source: "192.0.2.10:5060".parse().unwrap(),
        user_agent: Some("battery"),
        conn: None,
        path: Vec::new(),
        owner: None,
        now,
    });
    let cfg = registrar::RegistrarConfig {
        max_contacts: 50,
        ..registrar::RegistrarConfig::default()
    };
    let decide = |current: &[Binding]| {
        registrar::apply(&cfg, current, &req, &mut || {
            IDS.fetch_add(1, Ordering::Relaxed)
        })
    };
    store.update(aor, &decide).await.unwrap()
}

fn contacts(bindings: &[Binding]) -> Vec<String> {
    let mut v: Vec<String> = bindings.iter().map(|b| b.contact.clone()).collect();
    v.sort();
    v
}

/// An AoR of its own for each run (Redis is shared between runs and tests).
fn aor(name: &str) -> String {
    format!(
        "{name}-{}-{}@battery.test",
        std::process::id(),
        IDS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Held by each test for its whole run: every test uses Redis database 15, which `redis()`
/// flushes, and tests run side by side (a flush between another test's write and its read
/// made CI fail once).
static REDIS_DB15: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn redis() -> Arc<dyn LocationStore> {
    let flushed = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-n", "15", "FLUSHDB"])
        .output()
        .expect("redis-cli (run scripts/ensure-services)");
    assert!(flushed.status.success());
    Arc::new(
        RedisLocation::open("redis://127.0.0.1:6379/15", "node-a".into())
            .await
            .expect("Redis on 127.0.0.1:6379 (run scripts/ensure-services)"),
    )
}

/// Every store under test, named.
async fn stores(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn LocationStore>)> {
    vec![
        ("in memory", Arc::new(EmbeddedLocation::in_memory())),
        (
            "journal",
            Arc::new(EmbeddedLocation::open(&dir.join("location.journal"), None, NOW).unwrap()),
        ),
        ("redis", redis().await),
    ]
}

#[tokio::test]
async fn bindings_are_added_refreshed_expired_and_removed_alike() {
    let _db15 = REDIS_DB15.lock().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in stores(dir.path()).await {
        let a = aor("alice");
        let s = &*store;
        register(s, &a, &["<sip:alice@192.0.2.10:5060>"], 600, ("c1", 1), NOW)
            .await
            .unwrap();
        register(s, &a, &["<sip:alice@192.0.2.11:5060>"], 60, ("c2", 1), NOW)
            .await
            .unwrap();
        let got = s.lookup(&a, NOW).await.unwrap();
        assert_eq!(got.len(), 2, "{name}");
        // A refresh of the same contact replaces it, it does not add one.
        register(
            s,
            &a,
            &["<sip:alice@192.0.2.10:5060>"],
            600,
            ("c1", 2),
            NOW + 1,
        )
        .await
        .unwrap();
        assert_eq!(s.lookup(&a, NOW + 1).await.unwrap().len(), 2, "{name}");
        // The short one has expired a minute later; lookups never return it.
        let later = s.lookup(&a, NOW + 61).await.unwrap();
        assert_eq!(
            contacts(&later),
            vec!["sip:alice@192.0.2.10:5060"],
            "{name}"
        );
        assert!(
            s.all(NOW + 61)
                .await
                .unwrap()
                .iter()
                .all(|b| b.expires_at > NOW + 61),
            "{name}"
        );
        // An older CSeq for the same Call-ID is refused, whatever the store.
        let stale = register(
            s,
            &a,
            &["<sip:alice@192.0.2.10:5060>"],
            600,
            ("c1", 1),
            NOW + 2,
        )
        .await;
        assert_eq!(stale.err(), Some(Reject::OutOfOrder), "{name}");
        // Contact: * with Expires: 0 removes everything.
        register(s, &a, &["*"], 0, ("c9", 1), NOW + 3)
            .await
            .unwrap();
        assert!(s.lookup(&a, NOW + 3).await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn concurrent_registrations_of_one_user_lose_nothing() {
    let _db15 = REDIS_DB15.lock().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, store) in stores(dir.path()).await {
        let a = aor("bob");
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (store, a) = (store.clone(), a.clone());
                tokio::spawn(async move {
                    let c = format!("<sip:bob@192.0.2.{}:5060>", 20 + i);
                    let cid = format!("dev-{i}");
                    register(&*store, &a, &[&c], 600, (&cid, 1), NOW)
                        .await
                        .unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let got = store.lookup(&a, NOW).await.unwrap();
        assert_eq!(got.len(), 20, "{name}: a concurrent update was lost");
    }
}

#[tokio::test]
async fn bindings_outlive_the_process_that_wrote_them() {
    let _db15 = REDIS_DB15.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("location.journal");
    let a = aor("carol");
    {
        let store = EmbeddedLocation::open(&journal, None, NOW).unwrap();
        register(
            &store,
            &a,
            &["<sip:carol@192.0.2.30:5060>"],
            600,
            ("c1", 1),
            NOW,
        )
        .await
        .unwrap();
    }
    let reopened = EmbeddedLocation::open(&journal, None, NOW + 5).unwrap();
    assert_eq!(
        reopened.lookup(&a, NOW + 5).await.unwrap().len(),
        1,
        "journal"
    );
    // Redis: another node sees what this one wrote, and says the bindings are shared.
    let node_a = redis().await;
    register(
        &*node_a,
        &a,
        &["<sip:carol@192.0.2.30:5060>"],
        600,
        ("c1", 1),
        NOW,
    )
    .await
    .unwrap();
    let node_b = RedisLocation::open("redis://127.0.0.1:6379/15", "node-b".into())
        .await
        .unwrap();
    assert_eq!(node_b.lookup(&a, NOW).await.unwrap().len(), 1, "redis");
    assert!(node_b.shared() && !reopened.shared());
}

#[tokio::test]
async fn a_node_rewriting_an_aor_keeps_the_flows_and_owner_routes_of_another() {
    let _db15 = REDIS_DB15.lock().await;
    let url = "redis://127.0.0.1:6379/15";
    let x = RedisLocation::open(url, "node-x".into()).await.unwrap();
    let y = RedisLocation::open(url, "node-y".into()).await.unwrap();
    let a = aor("shared");
    let route = "<sip:0a0b@10.0.0.2:5090;transport=tcp;lr>";
    // Node x: a device on its connection 7, reachable by others through x's owner route.
    register_flow(
        &x,
        &a,
        &["<sip:web@df7jal23ls0d.invalid;transport=ws>"],
        600,
        ("cx", 1),
        NOW,
        |r| RegisterRequest {
            transport: Transport::Wss,
            conn: Some(7),
            owner: Some(route),
            ..r
        },
    )
    .await
    .unwrap();
    // Node y rewrites the AoR (another device of the same user registers through it).
    register(&y, &a, &["<sip:desk@192.0.2.31:5060>"], 600, ("cy", 1), NOW)
        .await
        .unwrap();
    let web = |bs: Vec<Binding>| {
        bs.into_iter()
            .find(|b| b.contact.contains(".invalid"))
            .expect("the web binding survives")
    };
    let on_x = web(x.lookup(&a, NOW).await.unwrap());
    assert!(on_x.here, "still x's own");
    assert_eq!(on_x.conn, Some(7), "x still knows its connection");
    assert_eq!(on_x.owner.as_deref(), Some(route));
    let on_y = web(y.lookup(&a, NOW).await.unwrap());
    assert!(!on_y.here);
    assert_eq!(on_y.conn, None, "a connection of x means nothing on y");
    assert_eq!(on_y.owner.as_deref(), Some(route));
    // And x rewriting it in turn leaves y's device as y's.
    register(
        &x,
        &a,
        &["<sip:web2@192.0.2.32:5060>"],
        600,
        ("cx2", 1),
        NOW,
    )
    .await
    .unwrap();
    let desk = y
        .lookup(&a, NOW)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.contact.contains("desk"))
        .unwrap();
    assert!(desk.here);
}
