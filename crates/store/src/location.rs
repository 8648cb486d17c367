//! The embedded location service: bindings in memory, sharded by AoR, and journaled to an
//! SQLite file so that a restart or a crash loses no registration.
//!
//! Every change is written by one journal thread that commits whatever has queued up in one
//! transaction (group commit), and [`LocationStore::update`] returns only after the commit,
//! so a 200 OK is never sent for a binding that is not on disk.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};

use async_trait::async_trait;
use careflow_core::registrar::{Outcome, Reject};
use careflow_core::{Binding, Transport};
use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use crate::migrations::{LOCATION_MIGRATIONS, migrate};

mod compact;
use crate::sqlite::open_sqlite;
use crate::{LocationStore, StoreError, UpdateFn};
use compact::{Stored, UserAgents};

const SHARDS: usize = 16;

/// An AoR's bindings, compact ([`compact`]), keyed by the AoR.
type Shard = Mutex<HashMap<Box<str>, Box<[Stored]>>>;

/// In-memory bindings with an optional on-disk journal.
#[derive(Debug)]
pub struct EmbeddedLocation {
    shards: Vec<Shard>,
    count: AtomicUsize,
    journal: Option<mpsc::Sender<JournalOp>>,
    agents: UserAgents,
}

#[derive(Debug)]
struct JournalOp {
    aor: String,
    bindings: Vec<Binding>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

impl EmbeddedLocation {
    /// Bindings in memory only (tests, or a node whose bindings live elsewhere).
    pub fn in_memory() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            count: AtomicUsize::new(0),
            journal: None,
            agents: UserAgents::default(),
        }
    }

    /// Opens the journal at `path`, loads the bindings still alive at `now` and starts the
    /// journal thread.
    pub fn open(path: &Path, now: u64) -> Result<Self, StoreError> {
        let mut conn = open_sqlite(path)?;
        migrate(&mut conn, LOCATION_MIGRATIONS)?;
        // The journal is written, and read only at start-up: a small page cache suffices.
        conn.execute_batch("PRAGMA cache_size=-256;")?;
        let mut me = Self::in_memory();
        // Row by row into the compact form (rows come ordered by AoR): no second copy of the
        // whole journal in memory while starting.
        let mut aor = String::new();
        let mut group: Vec<Stored> = Vec::new();
        load_each(&conn, now, |b| {
            if b.aor != aor {
                me.put_loaded(&aor, std::mem::take(&mut group))?;
                aor.clone_from(&b.aor);
            }
            group.push(Stored::keep(b, &me.agents));
            Ok(())
        })?;
        me.put_loaded(&aor, group)?;
        conn.execute("DELETE FROM binding WHERE expires_at <= ?1", [now as i64])?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("location-journal".into())
            .spawn(move || journal_thread(conn, rx))
            .map_err(|e| {
                StoreError::backend("location journal", format!("cannot start its thread: {e}"))
            })?;
        me.journal = Some(tx);
        Ok(me)
    }

    fn shard(&self, aor: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        aor.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn put_loaded(&self, aor: &str, group: Vec<Stored>) -> Result<(), StoreError> {
        if group.is_empty() {
            return Ok(());
        }
        self.count.fetch_add(group.len(), Ordering::Relaxed);
        let mut map = self.shard(aor).lock().map_err(|_| poisoned())?;
        map.insert(aor.into(), group.into_boxed_slice());
        Ok(())
    }

    fn set(
        &self,
        map: &mut HashMap<Box<str>, Box<[Stored]>>,
        aor: &str,
        new: Vec<Binding>,
    ) -> Vec<Binding> {
        let old_len = map.get(aor).map_or(0, |v| v.len());
        let new_len = new.len();
        let journal_copy = if self.journal.is_some() {
            new.clone()
        } else {
            Vec::new()
        };
        if new.is_empty() {
            map.remove(aor);
        } else {
            let kept: Box<[Stored]> = new
                .into_iter()
                .map(|b| Stored::keep(b, &self.agents))
                .collect();
            match map.get_mut(aor) {
                Some(v) => *v = kept,
                None => {
                    map.insert(aor.into(), kept);
                }
            }
        }
        if new_len >= old_len {
            self.count.fetch_add(new_len - old_len, Ordering::Relaxed);
        } else {
            self.count.fetch_sub(old_len - new_len, Ordering::Relaxed);
        }
        journal_copy
    }

    fn send(&self, op: JournalOp) -> Result<(), StoreError> {
        match &self.journal {
            Some(tx) => tx
                .send(op)
                .map_err(|_| StoreError::backend("location journal", "stopped")),
            None => {
                if let Some(done) = op.done {
                    let _ = done.send(Ok(()));
                }
                Ok(())
            }
        }
    }
}

fn poisoned() -> StoreError {
    StoreError::backend("location journal", "lock poisoned")
}

#[async_trait]
impl LocationStore for EmbeddedLocation {
    async fn update(
        &self,
        aor: &str,
        decide: UpdateFn<'_>,
    ) -> Result<Result<Outcome, Reject>, StoreError> {
        let (rx, outcome) = {
            let mut map = self.shard(aor).lock().map_err(|_| poisoned())?;
            let current: Vec<Binding> = map
                .get(aor)
                .map(|v| v.iter().map(|s| s.binding(aor)).collect())
                .unwrap_or_default();
            let outcome = match decide(&current) {
                Ok(o) => o,
                Err(r) => return Ok(Err(r)),
            };
            if !outcome.changed {
                return Ok(Ok(outcome));
            }
            let copy = self.set(&mut map, aor, outcome.bindings.clone());
            let (done, rx) = oneshot::channel();
            // Sent under the shard lock so journal order matches the order of changes.
            self.send(JournalOp {
                aor: aor.to_string(),
                bindings: copy,
                done: Some(done),
            })?;
            (rx, outcome)
        };
        match rx.await {
            Ok(Ok(())) => Ok(Ok(outcome)),
            Ok(Err(e)) => Err(StoreError::unavailable("location journal", e)),
            Err(_) => Err(StoreError::backend("location journal", "stopped")),
        }
    }

    async fn lookup(&self, aor: &str, now: u64) -> Result<Vec<Binding>, StoreError> {
        let map = self.shard(aor).lock().map_err(|_| poisoned())?;
        Ok(map
            .get(aor)
            .map(|v| {
                v.iter()
                    .filter(|b| b.expires_at() > now)
                    .map(|b| b.binding(aor))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn all(&self, now: u64) -> Result<Vec<Binding>, StoreError> {
        self.all_where(now, &|_| true).await
    }

    async fn all_where(
        &self,
        now: u64,
        keep: &(dyn for<'b> Fn(&'b Binding) -> bool + Send + Sync),
    ) -> Result<Vec<Binding>, StoreError> {
        let mut out = Vec::new();
        for s in &self.shards {
            let map = s.lock().map_err(|_| poisoned())?;
            out.extend(map.iter().flat_map(|(aor, v)| {
                v.iter()
                    .filter(|b| b.expires_at() > now)
                    .map(|b| b.binding(aor))
                    .filter(|b| keep(b))
            }));
        }
        out.sort_by(|a, b| a.aor.cmp(&b.aor).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn remove_expired(&self, now: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for s in &self.shards {
            let mut map = s.lock().map_err(|_| poisoned())?;
            let stale: Vec<String> = map
                .iter()
                .filter(|(_, v)| v.iter().any(|b| b.expires_at() <= now))
                .map(|(k, _)| k.to_string())
                .collect();
            for aor in stale {
                let live: Vec<Binding> = map
                    .get(aor.as_str())
                    .map(|v| {
                        v.iter()
                            .filter(|b| b.expires_at() > now)
                            .map(|b| b.binding(&aor))
                            .collect()
                    })
                    .unwrap_or_default();
                removed += map.get(aor.as_str()).map_or(0, |v| v.len()) - live.len();
                let copy = self.set(&mut map, &aor, live);
                self.send(JournalOp {
                    aor,
                    bindings: copy,
                    done: None,
                })?;
            }
            // After a burst the map gives its room back.
            let len = map.len();
            if map.capacity() > 4 * len + 1024 {
                map.shrink_to(2 * len);
            }
        }
        self.agents.release_unused();
        Ok(removed)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

fn load(conn: &Connection, now: u64) -> Result<Vec<Binding>, StoreError> {
    let mut out = Vec::new();
    load_each(conn, now, |b| {
        out.push(b);
        Ok(())
    })?;
    Ok(out)
}

/// Each binding alive at `now`, ordered by AoR, given to `each` as it is read.
fn load_each(
    conn: &Connection,
    now: u64,
    mut each: impl FnMut(Binding) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut st = conn.prepare(
        "SELECT id, aor, contact, call_id, cseq, expires_at, registered_at, q, instance, reg_id, transport, source, user_agent, path
         FROM binding WHERE expires_at > ?1 ORDER BY aor, id",
    )?;
    let rows = st.query_map([now as i64], |r| {
        Ok((
            Binding {
                id: r.get::<_, i64>(0)? as u64,
                aor: r.get(1)?,
                contact: r.get(2)?,
                call_id: r.get(3)?,
                cseq: r.get::<_, i64>(4)? as u32,
                expires_at: r.get::<_, i64>(5)? as u64,
                registered_at: r.get::<_, i64>(6)? as u64,
                q: r.get::<_, Option<i64>>(7)?.map(|q| q as u16),
                instance: r.get(8)?,
                reg_id: r.get::<_, Option<i64>>(9)?.map(|v| v as u32),
                transport: Transport::Udp,
                source: "0.0.0.0:0".parse().unwrap_or_else(|_| unreachable!()),
                user_agent: r.get(12)?,
                conn: None,
                here: true,
                owner: None,
                path: r
                    .get::<_, Option<String>>(13)?
                    .map(|p| p.lines().map(str::to_string).collect())
                    .unwrap_or_default(),
            },
            r.get::<_, String>(10)?,
            r.get::<_, String>(11)?,
        ))
    })?;
    for row in rows {
        let (mut b, transport, source) = row?;
        // Rows we cannot read back are skipped (and logged) rather than failing startup.
        match (transport.parse(), source.parse()) {
            (Ok(t), Ok(s)) => {
                b.transport = t;
                b.source = s;
                each(b)?;
            }
            _ => tracing::warn!(aor = %b.aor, "skipping unreadable binding row"),
        }
    }
    Ok(())
}

/// How long the journal waits for more changes before committing, so that one commit (and
/// its WAL write and file locks) covers many registrations under load.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

fn journal_thread(mut conn: Connection, rx: mpsc::Receiver<JournalOp>) {
    while let Ok(first) = rx.recv() {
        // Sleep instead of waiting on the channel: senders then find no parked receiver to
        // wake, so a batch costs one wake-up instead of one per change.
        std::thread::sleep(LINGER);
        let mut batch = vec![first];
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
        }
        let result = write_batch(&mut conn, &batch).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = batch.len(), "location journal write failed");
        }
        for op in batch {
            if let Some(done) = op.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn write_batch(conn: &mut Connection, batch: &[JournalOp]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut del = tx.prepare_cached("DELETE FROM binding WHERE aor = ?1")?;
        let mut ins = tx.prepare_cached(
            "INSERT OR REPLACE INTO binding (id, aor, contact, call_id, cseq, expires_at, registered_at, q, instance, reg_id, transport, source, user_agent, path)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        for op in batch {
            del.execute([&op.aor])?;
            for b in &op.bindings {
                ins.execute(params![
                    b.id as i64,
                    b.aor,
                    b.contact,
                    b.call_id,
                    i64::from(b.cseq),
                    b.expires_at as i64,
                    b.registered_at as i64,
                    b.q.map(i64::from),
                    b.instance,
                    b.reg_id.map(i64::from),
                    b.transport.as_str(),
                    b.source.to_string(),
                    b.user_agent,
                    (!b.path.is_empty()).then(|| b.path.join("\n")),
                ])?;
            }
        }
    }
    tx.commit()
}

/// Reads the bindings on disk without starting a server (for `careflow-sip registrations`).
pub fn read_journal(path: &Path, now: u64) -> Result<Vec<Binding>, StoreError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut conn = open_sqlite(path)?;
    migrate(&mut conn, LOCATION_MIGRATIONS)?;
    load(&conn, now)
}

#[cfg(test)]
mod tests {
    use careflow_core::registrar::{self, ContactValue, RegisterRequest, RegistrarConfig};

    use super::*;

    fn register(
        contact: &str,
        expires: u32,
        cseq: u32,
        now: u64,
    ) -> impl Fn(&[Binding]) -> Result<Outcome, Reject> + Send + Sync {
        let contact = contact.to_string();
        move |cur: &[Binding]| {
            let req = RegisterRequest {
                aor: "alice@example.com",
                call_id: "c",
                cseq,
                expires: Some(expires),
                contacts: vec![ContactValue::parse(&contact).unwrap()],
                transport: Transport::Tcp,
                source: "192.0.2.7:5070".parse().unwrap(),
                user_agent: Some("ua"),
                conn: None,
                path: vec!["<sip:edge.example.com;lr>"],
                owner: None,
                now,
            };
            registrar::apply(&RegistrarConfig::default(), cur, &req, &mut || 7)
        }
    }

    #[tokio::test]
    async fn persists_across_reopen_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("location.db");
        let loc = EmbeddedLocation::open(&path, 1000).unwrap();
        let o = loc
            .update(
                "alice@example.com",
                &register("<sip:a@192.0.2.7:5070>", 600, 1, 1000),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.bindings.len(), 1);
        assert_eq!(loc.count(), 1);
        drop(loc);
        let loc = EmbeddedLocation::open(&path, 1100).unwrap();
        let b = loc.lookup("alice@example.com", 1100).await.unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].transport, Transport::Tcp);
        assert_eq!(b[0].source.to_string(), "192.0.2.7:5070");
        assert_eq!(b[0].path, vec!["<sip:edge.example.com;lr>".to_string()]);
        assert_eq!(read_journal(&path, 1100).unwrap().len(), 1);
        assert_eq!(loc.remove_expired(1700).await.unwrap(), 1);
        assert_eq!(loc.count(), 0);
        // refused updates change nothing
        let r = loc
            .update("alice@example.com", &register("<sip:a@h>", 5, 2, 1700))
            .await
            .unwrap();
        assert!(r.is_err());
        drop(loc);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(read_journal(&path, 1700).unwrap().is_empty());
    }

    #[tokio::test]
    async fn all_where_returns_the_live_bindings_it_is_asked_for() {
        let loc = EmbeddedLocation::in_memory();
        for (contact, expires) in [
            ("<sip:a@192.0.2.7:5070>", 600),
            ("<sip:b@192.0.2.7:5071>", 60),
        ] {
            loc.update("alice@example.com", &register(contact, expires, 1, 1000))
                .await
                .unwrap()
                .unwrap();
        }
        let b_only = |b: &Binding| b.contact.contains("sip:b@");
        let got = loc.all_where(1000, &b_only).await.unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].contact.contains("sip:b@"));
        assert_eq!(loc.all(1000).await.unwrap().len(), 2);
        // Expired bindings are not offered to the filter's caller.
        assert!(loc.all_where(1100, &b_only).await.unwrap().is_empty());
    }
}
