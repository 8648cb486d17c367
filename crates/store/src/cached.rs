//! Subscriber lookups from memory: every authenticated REGISTER, SUBSCRIBE and call reads its
//! user's row, and a phone sends several in a few seconds (a registration, one SUBSCRIBE per
//! busy-lamp key, its calls). [`CachedSubscribers`] wraps any [`SubscriberStore`] and keeps
//! what authentication reads ([`SubscriberStore::auth_row`]) for a while, compactly (the HA1s
//! as bytes: about 150 bytes a row); everything else goes to the store as it is.
//!
//! Coherence: a write through this store forgets that row at once (an import forgets
//! everything); [`CachedSubscribers::forget`] is called for a change another node announced;
//! the time to live bounds how long a change this process cannot see (the `careflow-sip user`
//! CLI, another node's write without an announcement) takes to count. Unknown users are not
//! kept, so a user added elsewhere registers at once; a lookup that raced with a write is not
//! kept either (the write's generation tells). Every backend compares user names and domains
//! exactly (MySQL's tables are `utf8mb4_bin`), so the key is the exact spelling.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use careflow_core::cache::TtlCache;

use crate::{AuthRow, NewSubscriber, StoreError, Subscriber, SubscriberStore};

type Key = (Box<str>, Box<str>);

/// An [`AuthRow`] in 50 bytes: HA1s kept as bytes. Only rows whose HA1s are lower-case hex
/// (or empty) are kept, so turning them back into text gives the stored text exactly (the
/// digest hashes the HA1's text).
#[derive(Debug, Clone)]
struct Compact {
    enabled: bool,
    md5: Option<[u8; 16]>,
    sha256: Option<[u8; 32]>,
}

impl Compact {
    fn of(row: &AuthRow) -> Option<Self> {
        Some(Self {
            enabled: row.enabled,
            md5: unhex(&row.ha1_md5)?,
            sha256: unhex(&row.ha1_sha256)?,
        })
    }

    fn row(&self) -> AuthRow {
        let text = |b: Option<&[u8]>| b.map(careflow_proto::digest::hex).unwrap_or_default();
        AuthRow {
            enabled: self.enabled,
            ha1_md5: text(self.md5.as_ref().map(|b| &b[..])),
            ha1_sha256: text(self.sha256.as_ref().map(|b| &b[..])),
        }
    }
}

/// `Some(None)` for "", `Some(Some(bytes))` for `N` bytes of lower-case hex (what
/// [`careflow_proto::digest::hex`] writes back), `None` otherwise.
fn unhex<const N: usize>(text: &str) -> Option<Option<[u8; N]>> {
    if text.is_empty() {
        return Some(None);
    }
    if text.bytes().any(|c| c.is_ascii_uppercase()) {
        return None;
    }
    careflow_proto::digest::unhex(text).map(Some)
}

/// A [`SubscriberStore`] that answers repeated authentication lookups from memory.
pub struct CachedSubscribers {
    inner: std::sync::Arc<dyn SubscriberStore>,
    cache: Mutex<TtlCache<Key, Compact>>,
    /// Bumped by every write: a lookup that started before a write must not keep its result.
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for CachedSubscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSubscribers")
            .field("hits", &self.hits.load(Ordering::Relaxed))
            .field("misses", &self.misses.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CachedSubscribers {
    /// Wraps `inner`, keeping at most `capacity` rows for `ttl` each.
    pub fn new(inner: std::sync::Arc<dyn SubscriberStore>, ttl: Duration, capacity: usize) -> Self {
        Self {
            inner,
            cache: Mutex::new(TtlCache::new(ttl, capacity)),
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Lookups answered from memory and from the store so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Rows held now.
    pub fn len(&self) -> usize {
        self.with_cache(|c| c.len())
    }

    /// True when no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets `username@domain` (it changed somewhere this store did not see).
    pub fn forget(&self, username: &str, domain: &str) {
        self.inner.refresh();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.with_cache(|c| c.remove(&(username.into(), domain.into())));
    }

    /// Forgets every row (changes were missed and cannot be named).
    pub fn forget_all(&self) {
        self.inner.refresh();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.with_cache(TtlCache::clear);
    }

    /// Drops the expired rows (a full cache also does it; this returns memory when lookups
    /// stop), and lets the store end a read snapshot left open by the last lookups.
    pub fn expire(&self, now: Instant) {
        self.inner.refresh();
        self.with_cache(|c| c.expire(now));
    }

    fn with_cache<T>(&self, f: impl FnOnce(&mut TtlCache<Key, Compact>) -> T) -> T {
        // A panic while holding the lock cannot leave the cache inconsistent in a way that
        // matters (at worst a row is missing): keep using it.
        let mut c = match self.cache.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        f(&mut c)
    }
}

#[async_trait]
impl SubscriberStore for CachedSubscribers {
    async fn auth_row(&self, username: &str, domain: &str) -> Result<Option<AuthRow>, StoreError> {
        let key: Key = (username.into(), domain.into());
        if let Some(c) = self.with_cache(|c| c.get(&key, Instant::now())) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(c.row()));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::SeqCst);
        let found = self.inner.auth_row(username, domain).await?;
        if let Some(compact) = found.as_ref().and_then(Compact::of) {
            self.with_cache(|c| {
                // Checked under the lock a write's forget takes too: no write slipped in.
                if self.generation.load(Ordering::SeqCst) == generation {
                    c.insert(key, compact, Instant::now());
                }
            });
        }
        Ok(found)
    }

    async fn find(&self, username: &str, domain: &str) -> Result<Option<Subscriber>, StoreError> {
        self.inner.find(username, domain).await
    }

    fn refresh(&self) {
        self.inner.refresh();
    }

    async fn add(&self, s: NewSubscriber) -> Result<(), StoreError> {
        let (u, d) = (s.username.clone(), s.domain.clone());
        let r = self.inner.add(s).await;
        self.forget(&u, &d);
        r
    }

    async fn set_ha1(
        &self,
        username: &str,
        domain: &str,
        md5: &str,
        sha256: &str,
    ) -> Result<bool, StoreError> {
        // Forgotten before and after: a lookup running across the write carries an older
        // generation than the second forget's, so it keeps nothing.
        self.forget(username, domain);
        let r = self.inner.set_ha1(username, domain, md5, sha256).await;
        self.forget(username, domain);
        r
    }

    async fn set_enabled(
        &self,
        username: &str,
        domain: &str,
        enabled: bool,
    ) -> Result<bool, StoreError> {
        self.forget(username, domain);
        let r = self.inner.set_enabled(username, domain, enabled).await;
        self.forget(username, domain);
        r
    }

    async fn remove(&self, username: &str, domain: &str) -> Result<bool, StoreError> {
        self.forget(username, domain);
        let r = self.inner.remove(username, domain).await;
        self.forget(username, domain);
        r
    }

    async fn list(&self) -> Result<Vec<Subscriber>, StoreError> {
        self.inner.list().await
    }

    async fn import(&self, rows: Vec<NewSubscriber>) -> Result<usize, StoreError> {
        self.forget_all();
        let r = self.inner.import(rows).await;
        self.forget_all();
        r
    }

    async fn find_by_careflow_user(&self, user_id: &str) -> Result<Option<Subscriber>, StoreError> {
        self.inner.find_by_careflow_user(user_id).await
    }

    async fn search(
        &self,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Subscriber>, StoreError> {
        self.inner.search(query, limit, offset).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::sqlite::SqliteSubscribers;

    /// A subscriber whose MD5 HA1 is `md5` repeated (one hex digit).
    fn row(user: &str, md5: char) -> NewSubscriber {
        NewSubscriber {
            username: user.into(),
            domain: "example.org".into(),
            email: None,
            careflow_user_id: None,
            careflow_care4w_id: None,
            ha1_md5: md5.to_string().repeat(32),
            ha1_sha256: "5".repeat(64),
        }
    }

    /// `user@example.org`'s row, which must exist.
    async fn held(c: &CachedSubscribers, user: &str) -> AuthRow {
        c.auth_row(user, "example.org").await.unwrap().unwrap()
    }

    fn md5(c: char) -> String {
        c.to_string().repeat(32)
    }

    async fn stores() -> (tempfile::TempDir, Arc<SqliteSubscribers>, CachedSubscribers) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(SqliteSubscribers::open(&dir.path().join("db.sqlite")).unwrap());
        let cached = CachedSubscribers::new(db.clone(), Duration::from_secs(600), 100);
        (dir, db, cached)
    }

    #[tokio::test]
    async fn repeated_lookups_are_answered_from_memory_and_writes_through_it_count_at_once() {
        let (_dir, _db, c) = stores().await;
        c.add(row("alice", '1')).await.unwrap();
        for _ in 0..3 {
            let s = c.auth_row("alice", "example.org").await.unwrap().unwrap();
            assert_eq!(s.ha1_md5, md5('1'));
        }
        assert_eq!(c.stats(), (2, 1));
        assert!(
            c.set_ha1("alice", "example.org", &md5('2'), &"6".repeat(64))
                .await
                .unwrap()
        );
        assert_eq!(held(&c, "alice").await.ha1_md5, md5('2'));
        assert!(c.set_enabled("alice", "example.org", false).await.unwrap());
        assert!(!held(&c, "alice").await.enabled);
        assert!(c.remove("alice", "example.org").await.unwrap());
        assert_eq!(c.auth_row("alice", "example.org").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_change_made_elsewhere_counts_once_forgotten_and_unknown_users_are_never_kept() {
        let (_dir, db, c) = stores().await;
        // Unknown, then added by another writer (the CLI): found at once.
        assert_eq!(c.auth_row("bob", "example.org").await.unwrap(), None);
        db.add(row("bob", '1')).await.unwrap();
        assert_eq!(held(&c, "bob").await.ha1_md5, md5('1'));
        // Changed by another writer: the cached row holds until it is forgotten (or expires).
        db.set_ha1("bob", "example.org", &md5('2'), &"6".repeat(64))
            .await
            .unwrap();
        assert_eq!(held(&c, "bob").await.ha1_md5, md5('1'));
        c.forget("bob", "example.org");
        assert_eq!(held(&c, "bob").await.ha1_md5, md5('2'));
        db.set_enabled("bob", "example.org", false).await.unwrap();
        c.forget_all();
        assert!(!held(&c, "bob").await.enabled);
    }

    #[tokio::test]
    async fn another_spelling_is_asked_of_the_store_as_the_store_would_answer_it() {
        let (_dir, _db, c) = stores().await;
        c.add(row("carol", '1')).await.unwrap();
        assert!(c.auth_row("carol", "example.org").await.unwrap().is_some());
        // SQLite compares case-sensitively: the cache must not answer "Carol" with carol's row.
        assert_eq!(c.auth_row("Carol", "example.org").await.unwrap(), None);
        assert!(c.auth_row("carol", "example.org").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn rows_whose_text_would_not_come_back_the_same_are_not_kept() {
        let (_dir, _db, c) = stores().await;
        let mut upper = row("erin", 'A');
        upper.ha1_sha256 = String::new();
        c.add(upper).await.unwrap();
        for _ in 0..2 {
            let r = c.auth_row("erin", "example.org").await.unwrap().unwrap();
            assert_eq!(r.ha1_md5, "A".repeat(32));
            assert_eq!(r.ha1_sha256, "");
        }
        assert_eq!(c.stats(), (0, 2));
        // An empty HA1 (no SHA-256 known) comes back empty from memory.
        let mut no_sha = row("frank", 'b');
        no_sha.ha1_sha256 = String::new();
        c.add(no_sha).await.unwrap();
        for _ in 0..2 {
            let r = c.auth_row("frank", "example.org").await.unwrap().unwrap();
            assert_eq!(
                (r.ha1_md5.as_str(), r.ha1_sha256.as_str()),
                (&*"b".repeat(32), "")
            );
        }
        assert_eq!(c.stats(), (1, 3));
        assert_eq!(c.len(), 1);
    }

    #[tokio::test]
    async fn an_import_forgets_every_row() {
        let (_dir, _db, c) = stores().await;
        c.add(row("dave", '1')).await.unwrap();
        c.auth_row("dave", "example.org").await.unwrap();
        c.import(vec![row("dave", '9')]).await.unwrap();
        assert_eq!(held(&c, "dave").await.ha1_md5, md5('9'));
    }
}
