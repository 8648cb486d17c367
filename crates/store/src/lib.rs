//! Storage for careflow-sip, behind two traits that state what the SIP side needs:
//!
//! - [`SubscriberStore`]: subscribers with HA1 digests (never passwords).
//! - [`LocationStore`]: registered bindings per address-of-record, updated atomically.
//!
//! Backends are modules: [`sqlite`] (the embedded default, subscribers) and [`location`]
//! (in-memory bindings persisted to an SQLite journal in the data directory). PostgreSQL,
//! MySQL and Redis backends implement the same traits.
#![warn(missing_docs)]

pub mod audit;
pub mod cached;
pub mod calls;
pub mod devices;
pub mod events;
pub mod kamailio;
pub mod location;
mod migrations;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sqlite;
mod subscriber;

use async_trait::async_trait;
use careflow_core::Binding;
use careflow_core::registrar::{Outcome, Reject};

pub use subscriber::{AuthRow, NewSubscriber, Subscriber};

/// Storage failures. Callers treat every variant as "fail safe": no one is authenticated
/// while the store is unavailable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached, or did not answer in time: a retry may succeed.
    #[error("{backend} unavailable: {source}")]
    Unavailable {
        /// sqlite, postgres, mysql, redis or the location journal.
        backend: &'static str,
        /// What the backend or its driver said.
        #[source]
        source: BoxError,
    },
    /// The backend answered with an error (schema, data, a bug of ours): the same request
    /// will fail again.
    #[error("{backend} error: {source}")]
    Backend {
        /// sqlite, postgres, mysql, redis or the location journal.
        backend: &'static str,
        /// What the backend or its driver said.
        #[source]
        source: BoxError,
    },
    /// A subscriber with that username and domain exists already.
    #[error("subscriber {0} exists already")]
    Conflict(String),
    /// The URL names a backend this build does not have.
    #[error("unsupported database URL: {0}")]
    Unsupported(String),
    /// Bad input (e.g. a malformed import row), with the reason.
    #[error("{0}")]
    Invalid(String),
}

/// The cause carried by [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl StoreError {
    /// The backend cannot be reached now (a retry may succeed).
    pub fn unavailable(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            backend,
            source: source.into(),
        }
    }

    /// The backend refused the request (a retry will not help).
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            backend,
            source: source.into(),
        }
    }

    /// Whether trying again later can succeed (the backend was unreachable or slow), as
    /// opposed to a request the backend refuses.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Self::Conflict("(username, domain)".into())
            }
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::CannotOpen
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::DiskFull
                ) =>
            {
                Self::unavailable("sqlite", e)
            }
            other => Self::backend("sqlite", other),
        }
    }
}

/// Subscriber records.
#[async_trait]
pub trait SubscriberStore: Send + Sync {
    /// The subscriber `username@domain`, enabled or not.
    async fn find(&self, username: &str, domain: &str) -> Result<Option<Subscriber>, StoreError>;
    /// What authenticating `username@domain` needs of its row, enabled or not: the lookup of
    /// every authenticated request, which [`cached::CachedSubscribers`] answers from memory.
    async fn auth_row(&self, username: &str, domain: &str) -> Result<Option<AuthRow>, StoreError> {
        Ok(self.find(username, domain).await?.map(AuthRow::from))
    }
    /// Makes the next read see every change committed so far by any process (a store whose
    /// lookups share a read snapshot ends it). Called when a change made elsewhere is
    /// announced.
    fn refresh(&self) {}
    /// Adds a subscriber; [`StoreError::Conflict`] when it exists.
    async fn add(&self, s: NewSubscriber) -> Result<(), StoreError>;
    /// Replaces both HA1 digests; false when there is no such subscriber.
    async fn set_ha1(
        &self,
        username: &str,
        domain: &str,
        md5: &str,
        sha256: &str,
    ) -> Result<bool, StoreError>;
    /// Enables or disables; false when there is no such subscriber.
    async fn set_enabled(
        &self,
        username: &str,
        domain: &str,
        enabled: bool,
    ) -> Result<bool, StoreError>;
    /// Removes; false when there was no such subscriber.
    async fn remove(&self, username: &str, domain: &str) -> Result<bool, StoreError>;
    /// Every subscriber, ordered by domain and username.
    async fn list(&self) -> Result<Vec<Subscriber>, StoreError>;
    /// Inserts or updates many subscribers in one transaction; returns how many.
    async fn import(&self, rows: Vec<NewSubscriber>) -> Result<usize, StoreError>;
    /// The subscriber created for a CareFlow user, if any.
    async fn find_by_careflow_user(&self, user_id: &str) -> Result<Option<Subscriber>, StoreError>;
    /// Subscribers whose username, e-mail or CareFlow user id contains `query` (all when
    /// empty), ordered by username.
    async fn search(
        &self,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Subscriber>, StoreError>;
}

/// Removes from `aor` every binding `drop` selects, in one location update (so it races with
/// no REGISTER); returns how many went.
pub async fn remove_bindings(
    location: &dyn LocationStore,
    aor: &str,
    drop: impl Fn(&Binding) -> bool + Send + Sync,
) -> Result<usize, StoreError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let removed = AtomicUsize::new(0);
    let decide = |cur: &[Binding]| -> Result<Outcome, Reject> {
        let bindings: Vec<Binding> = cur.iter().filter(|b| !drop(b)).cloned().collect();
        let n = cur.len() - bindings.len();
        removed.store(n, Ordering::Relaxed);
        Ok(Outcome {
            bindings,
            changed: n > 0,
        })
    };
    // The decision above never refuses.
    let _ = location.update(aor, &decide).await?;
    Ok(removed.load(Ordering::Relaxed))
}

/// A LIKE pattern matching `query` anywhere, its wildcards escaped with `\` (so a search for
/// `a_b` finds `a_b` only); every backend writes `LIKE ? ESCAPE '\'` or the equivalent.
pub(crate) fn like_pattern(query: &str) -> String {
    format!(
        "%{}%",
        query
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

/// A subscriber database: subscribers, API keys, call records, the audit trail and provisioned
/// devices in one place (`DB_URL`).
pub trait Database:
    SubscriberStore + ApiKeyStore + calls::CallRecordStore + audit::AuditStore + devices::DeviceStore
{
}

impl<
    T: SubscriberStore
        + ApiKeyStore
        + calls::CallRecordStore
        + audit::AuditStore
        + devices::DeviceStore,
> Database for T
{
}

/// Opens the database `DB_URL` names and brings its schema up to date.
pub async fn open_database(
    url: &sqlite::DbUrl,
) -> Result<std::sync::Arc<dyn Database>, StoreError> {
    Ok(match url {
        sqlite::DbUrl::Sqlite(path) => std::sync::Arc::new(sqlite::SqliteSubscribers::open(path)?),
        sqlite::DbUrl::Postgres(u) => std::sync::Arc::new(postgres::PgSubscribers::open(u).await?),
        sqlite::DbUrl::Mysql(u) => std::sync::Arc::new(mysql::MysqlSubscribers::open(u).await?),
    })
}

/// An admin API key as listed (the key itself is never stored, only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Name given at creation.
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<i64>,
}

/// Admin API keys, stored as SHA-256 digests.
#[async_trait]
pub trait ApiKeyStore: Send + Sync {
    /// Stores a new key's digest under a unique name.
    async fn create_key(&self, name: &str, sha256_hex: &str) -> Result<(), StoreError>;
    /// Every key, revoked ones too.
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError>;
    /// Revokes a key by name; false when there is none.
    async fn revoke_key(&self, name: &str) -> Result<bool, StoreError>;
    /// The name of the live key with this digest.
    async fn key_name(&self, sha256_hex: &str) -> Result<Option<String>, StoreError>;
}

/// A registrar decision applied to the current bindings of one AoR.
pub type UpdateFn<'a> = &'a (dyn Fn(&[Binding]) -> Result<Outcome, Reject> + Send + Sync);

/// The location service.
#[async_trait]
pub trait LocationStore: Send + Sync {
    /// Applies `decide` to the AoR's bindings atomically and stores the result durably
    /// before returning it.
    async fn update(
        &self,
        aor: &str,
        decide: UpdateFn<'_>,
    ) -> Result<Result<Outcome, Reject>, StoreError>;
    /// Live bindings of an AoR at `now`.
    async fn lookup(&self, aor: &str, now: u64) -> Result<Vec<Binding>, StoreError>;
    /// Every live binding at `now`.
    async fn all(&self, now: u64) -> Result<Vec<Binding>, StoreError>;
    /// The live bindings at `now` that `keep` accepts. A store holding its bindings in memory
    /// answers without copying the others: a periodic scan for a few (the NAT keep-alive
    /// round, every 30 s) must not allocate a copy of 100,000 bindings each time.
    async fn all_where(
        &self,
        now: u64,
        keep: &(dyn for<'b> Fn(&'b Binding) -> bool + Send + Sync),
    ) -> Result<Vec<Binding>, StoreError> {
        let mut all = self.all(now).await?;
        all.retain(|b| keep(b));
        Ok(all)
    }
    /// Removes bindings expired at `now`; returns how many.
    async fn remove_expired(&self, now: u64) -> Result<usize, StoreError>;
    /// Number of bindings held (for metrics).
    fn count(&self) -> usize;
    /// Whether other nodes use the same bindings (then a node must not treat bindings over
    /// connections it does not hold as stale).
    fn shared(&self) -> bool {
        false
    }
}

/// The newest schema versions this build knows, as recorded in `schema_migrations`:
/// (subscriber database, location journal). A backup made by a newer build has higher ones.
pub fn schema_versions() -> (i64, i64) {
    let last = |steps: &[(i64, &str)]| steps.last().map_or(0, |s| s.0);
    (
        last(migrations::SUBSCRIBER_MIGRATIONS),
        last(migrations::LOCATION_MIGRATIONS),
    )
}
