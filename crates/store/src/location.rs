//! The embedded location service: bindings in memory, sharded by AoR, and journaled to an
//! append-only file ([`journal`]) so that a restart or a crash loses no registration.
//!
//! Every change is written by one journal thread that appends whatever has queued up with one
//! write (group commit), and [`LocationStore::update`] returns only after that write, so a
//! 200 OK is never sent for a binding the journal does not have.

use std::hash::BuildHasher;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use async_trait::async_trait;
use careflow_core::registrar::{Outcome, Reject};
use careflow_core::{Binding, Transport};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::migrations::{LOCATION_MIGRATIONS, migrate};

mod compact;
pub mod journal;
use crate::sqlite::open_sqlite;
use crate::{LocationStore, StoreError, UpdateFn};
use compact::{Stored, UserAgents};
use journal::{Replay, Sink, Writer};

const SHARDS: usize = 16;

/// An AoR's bindings, compact ([`compact`]), keyed by the AoR.
type Shard = Mutex<HashMap<Box<str>, Box<[Stored]>>>;
type HashMap<K, V> = foldhash::HashMap<K, V>;

/// In-memory bindings with an optional on-disk journal.
#[derive(Debug)]
pub struct EmbeddedLocation {
    shards: Arc<[Shard]>,
    count: AtomicUsize,
    journal: Option<mpsc::Sender<JournalOp>>,
    agents: UserAgents,
}

/// Framed journal records of one change, and who waits for them to be written.
#[derive(Debug)]
struct JournalOp {
    record: Vec<u8>,
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

    /// Opens the journal at `path`, loads the bindings still alive at `now`, writes them as
    /// the journal's new start and starts the journal thread. When there is no journal yet
    /// and `legacy` names the SQLite journal of earlier versions (`location.db`), its
    /// bindings are imported and the file is kept as `location.db.imported`.
    pub fn open(path: &Path, legacy: Option<&Path>, now: u64) -> Result<Self, StoreError> {
        let me = Self::in_memory();
        let mut imported = None;
        if path.exists() {
            let r = journal::replay(path, |aor, bindings| {
                me.put_loaded(&aor, bindings, now).map_err(io::Error::other)
            })
            .map_err(|e| journal_error(path, "cannot read", e))?;
            me.keep_damaged(path, r);
        } else if let Some(db) = legacy.filter(|db| db.exists()) {
            let conn = open_legacy(db)?;
            let mut aor = String::new();
            let mut group: Vec<Binding> = Vec::new();
            load_each(&conn, now, |b| {
                if b.aor != aor {
                    me.put_loaded(&aor, std::mem::take(&mut group), now)?;
                    aor.clone_from(&b.aor);
                }
                group.push(b);
                Ok(())
            })?;
            me.put_loaded(&aor, group, now)?;
            drop(conn);
            imported = Some(db);
        }
        let count = me.live_count()?;
        me.count.store(count, Ordering::Relaxed);
        let shards = Arc::clone(&me.shards);
        let writer = Writer::rewrite(path, |sink| snapshot(&shards, sink))
            .map_err(|e| journal_error(path, "cannot write", e))?;
        if let Some(db) = imported {
            retire_legacy(db, count);
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("location-journal".into())
            .spawn(move || journal_thread(writer, shards, rx))
            .map_err(|e| {
                StoreError::backend("location journal", format!("cannot start its thread: {e}"))
            })?;
        Ok(Self {
            journal: Some(tx),
            ..me
        })
    }

    /// A journal that ended in a torn or damaged record is kept beside the new one.
    fn keep_damaged(&self, path: &Path, r: Replay) {
        if r.discarded == 0 {
            return;
        }
        let kept = journal::sibling(path, &format!(".damaged-{}", std::process::id()));
        let copied = std::fs::copy(path, &kept);
        tracing::warn!(
            journal = %path.display(),
            records = r.records,
            discarded_bytes = r.discarded,
            kept = %kept.display(),
            copied = copied.is_ok(),
            "the registration journal ends in a torn or damaged record (a crash or a power cut while writing): the records before it are loaded, the file is kept as it was"
        );
    }

    /// Replaces what an AoR holds with the bindings of a loaded record still alive at `now`.
    fn put_loaded(&self, aor: &str, bindings: Vec<Binding>, now: u64) -> Result<(), StoreError> {
        if aor.is_empty() {
            return Ok(());
        }
        let mut map = self.shard(aor).lock().map_err(|_| poisoned())?;
        let live: Box<[Stored]> = bindings
            .into_iter()
            .filter(|b| b.expires_at > now)
            .map(|b| Stored::keep(b, &self.agents))
            .collect();
        if live.is_empty() {
            map.remove(aor);
        } else {
            map.insert(aor.into(), live);
        }
        Ok(())
    }

    fn live_count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for s in self.shards.iter() {
            n += s
                .lock()
                .map_err(|_| poisoned())?
                .values()
                .map(|v| v.len())
                .sum::<usize>();
        }
        Ok(n)
    }

    fn shard(&self, aor: &str) -> &Shard {
        let h = foldhash::fast::FixedState::default().hash_one(aor);
        &self.shards[(h as usize) % SHARDS]
    }

    fn set(
        &self,
        map: &mut HashMap<Box<str>, Box<[Stored]>>,
        aor: &str,
        new: Vec<Binding>,
    ) -> Vec<u8> {
        let old_len = map.get(aor).map_or(0, |v| v.len());
        let new_len = new.len();
        let mut record = Vec::new();
        if self.journal.is_some() {
            journal::put_record(&mut record, aor, new.iter());
        }
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
        record
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
            let record = self.set(&mut map, aor, outcome.bindings.clone());
            let (done, rx) = oneshot::channel();
            // Sent under the shard lock so journal order matches the order of changes.
            self.send(JournalOp {
                record,
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
        for s in self.shards.iter() {
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
        for s in self.shards.iter() {
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
                let record = self.set(&mut map, &aor, live);
                self.send(JournalOp { record, done: None })?;
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

/// All bindings of the SQLite journal of earlier versions alive at `now`.
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

fn journal_error(path: &Path, what: &str, e: io::Error) -> StoreError {
    StoreError::backend(
        "location journal",
        format!("{what} {}: {e}", path.display()),
    )
}

/// Every AoR's bindings as framed records, one shard at a time (each shard locked only
/// while it is encoded).
fn snapshot(shards: &[Shard], sink: Sink<'_>) -> io::Result<()> {
    let mut buf = Vec::new();
    for s in shards {
        buf.clear();
        {
            let map = s
                .lock()
                .map_err(|_| io::Error::other("location shard lock poisoned"))?;
            for (aor, stored) in map.iter() {
                let bindings: Vec<Binding> = stored.iter().map(|b| b.binding(aor)).collect();
                journal::put_record(&mut buf, aor, bindings.iter());
            }
        }
        sink(&buf)?;
    }
    Ok(())
}

/// How long the journal waits for more changes before writing, so that one write (and one
/// wake-up of this thread) covers many registrations under load.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);
/// After a failed rewrite (a full disk), appending goes on and the rewrite is tried again
/// this much later.
const REWRITE_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

fn journal_thread(mut writer: Writer, shards: Arc<[Shard]>, rx: mpsc::Receiver<JournalOp>) {
    let mut buf = Vec::new();
    let mut next_rewrite = std::time::Instant::now();
    while let Ok(first) = rx.recv() {
        // Sleep instead of waiting on the channel: senders then find no parked receiver to
        // wake, so a batch costs one wake-up instead of one per change.
        std::thread::sleep(LINGER);
        let mut batch = vec![first];
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
        }
        buf.clear();
        for op in &batch {
            buf.extend_from_slice(&op.record);
        }
        let result = writer.append(&buf).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(journal = %writer.path().display(), error = %e, changes = batch.len(),
                "registration journal write failed");
        }
        for op in batch {
            if let Some(done) = op.done {
                let _ = done.send(result.clone());
            }
        }
        // A burst's buffer is given back.
        if buf.capacity() > 1 << 20 {
            buf = Vec::new();
        }
        if writer.wants_rewrite() && std::time::Instant::now() >= next_rewrite {
            // Changes queued meanwhile are appended after the snapshot: each record is an
            // AoR's whole state, so replaying them again after it ends in the same state.
            match Writer::rewrite(writer.path(), |sink| snapshot(&shards, sink)) {
                Ok(w) => writer = w,
                Err(e) => {
                    tracing::error!(journal = %writer.path().display(), error = %e,
                        "cannot rewrite the registration journal; appending to it as before");
                    next_rewrite = std::time::Instant::now() + REWRITE_RETRY;
                }
            }
        }
    }
}

/// Reads the bindings alive at `now` without starting a server (for `careflow-sip
/// registrations`): from the journal at `path`, or when there is none yet, from the SQLite
/// journal of earlier versions at `legacy`.
pub fn read_journal(
    path: &Path,
    legacy: Option<&Path>,
    now: u64,
) -> Result<Vec<Binding>, StoreError> {
    if !path.exists() {
        return match legacy.filter(|db| db.exists()) {
            Some(db) => load(&open_legacy(db)?, now),
            None => Ok(Vec::new()),
        };
    }
    let mut by_aor: HashMap<String, Vec<Binding>> = HashMap::default();
    journal::replay(path, |aor, bindings| {
        if bindings.is_empty() {
            by_aor.remove(&aor);
        } else {
            by_aor.insert(aor, bindings);
        }
        Ok(())
    })
    .map_err(|e| journal_error(path, "cannot read", e))?;
    let mut out: Vec<Binding> = by_aor
        .into_values()
        .flatten()
        .filter(|b| b.expires_at > now)
        .collect();
    out.sort_by(|a, b| a.aor.cmp(&b.aor).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Reads the whole journal at `path` (a backup's copy) and says how it ends.
pub fn check_journal(path: &Path) -> Result<Replay, StoreError> {
    journal::replay(path, |_, _| Ok(())).map_err(|e| journal_error(path, "cannot read", e))
}

/// The SQLite journal of earlier versions, brought to its last schema to be read.
fn open_legacy(db: &Path) -> Result<Connection, StoreError> {
    let mut conn = open_sqlite(db)?;
    migrate(&mut conn, LOCATION_MIGRATIONS)?;
    Ok(conn)
}

/// Once its bindings are in the new journal, the SQLite journal is renamed so that it is not
/// imported again; it is kept for an operator who wants to look.
fn retire_legacy(db: &Path, count: usize) {
    let kept = journal::sibling(db, ".imported");
    match std::fs::rename(db, &kept) {
        Ok(()) => {
            for side in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(journal::sibling(db, side));
            }
            tracing::info!(from = %db.display(), kept = %kept.display(), bindings = count,
                "registrations imported from the SQLite journal of an earlier version");
        }
        Err(e) => tracing::warn!(from = %db.display(), error = %e,
            "registrations imported from the SQLite journal of an earlier version, but it cannot be renamed; the new journal is used from now on"),
    }
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
        let path = dir.path().join("location.journal");
        let loc = EmbeddedLocation::open(&path, None, 1000).unwrap();
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
        let loc = EmbeddedLocation::open(&path, None, 1100).unwrap();
        let b = loc.lookup("alice@example.com", 1100).await.unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].transport, Transport::Tcp);
        assert_eq!(b[0].source.to_string(), "192.0.2.7:5070");
        assert_eq!(b[0].path, vec!["<sip:edge.example.com;lr>".to_string()]);
        assert_eq!(read_journal(&path, None, 1100).unwrap().len(), 1);
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
        assert!(read_journal(&path, None, 1700).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rewrite_while_changes_go_on_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("location.journal");
        let loc = Arc::new(EmbeddedLocation::open(&path, None, 1000).unwrap());
        // 500 phones refresh 120 times: about 10 MB of records, past the size at which the
        // journal thread rewrites the file while the next round's changes queue up.
        let rounds = 120u32;
        for round in 1..=rounds {
            let mut tasks = tokio::task::JoinSet::new();
            for u in 0..500 {
                let loc = loc.clone();
                tasks.spawn(async move {
                    let aor = format!("u{u}@clinic.example");
                    let decide = register("<sip:a@192.0.2.7:5070>", 600 + round, round, 1000);
                    loc.update(&aor, &decide).await.unwrap().unwrap();
                });
            }
            while let Some(t) = tasks.join_next().await {
                t.unwrap();
            }
        }
        let on_disk = std::fs::metadata(&path).unwrap().len();
        assert!(
            on_disk < 8 << 20,
            "the journal was never rewritten: {on_disk} bytes"
        );
        drop(loc);
        let loc = EmbeddedLocation::open(&path, None, 1000).unwrap();
        assert_eq!(loc.count(), 500);
        for u in [0, 250, 499] {
            let b = loc
                .lookup(&format!("u{u}@clinic.example"), 1000)
                .await
                .unwrap();
            assert_eq!(b.len(), 1);
            assert_eq!(b[0].cseq, rounds, "u{u}: an older state came back");
            assert_eq!(b[0].expires_at, 1000 + 600 + u64::from(rounds));
        }
    }

    #[tokio::test]
    async fn a_journal_torn_by_a_crash_loads_what_it_holds_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("location.journal");
        let loc = EmbeddedLocation::open(&path, None, 1000).unwrap();
        loc.update(
            "alice@example.com",
            &register("<sip:a@192.0.2.7:5070>", 600, 1, 1000),
        )
        .await
        .unwrap()
        .unwrap();
        drop(loc);
        // A power cut in the middle of the next write.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
        drop(f);
        let loc = EmbeddedLocation::open(&path, None, 1100).unwrap();
        assert_eq!(
            loc.lookup("alice@example.com", 1100).await.unwrap().len(),
            1
        );
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
            .collect();
        assert_eq!(kept.len(), 1, "the damaged journal is kept for a look");
        // The new journal starts clean.
        assert_eq!(read_journal(&path, None, 1100).unwrap().len(), 1);
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
