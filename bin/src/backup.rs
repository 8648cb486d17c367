//! `careflow-sip backup DIR` and `careflow-sip restore DIR` for the embedded store: the
//! subscriber database (with the API keys), the registration journal, the nonce secret and the
//! generated TLS certificate. A backup is a consistent copy taken while the server runs
//! (SQLite `VACUUM INTO`; the append-only journal copied and cut after its last whole
//! record); a restore checks every file first and keeps what it replaces.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use careflow_store::sqlite::DbUrl;

use crate::config::Config;

const MANIFEST: &str = "careflow-sip-backup.txt";
/// Plain files copied as they are (the secret and the generated certificate).
const PLAIN_FILES: &[&str] = &["secret", "tls-selfsigned.crt", "tls-selfsigned.key"];

/// The registration journal's name in a backup.
const JOURNAL: &str = "location.journal";
/// The SQLite registration journal of earlier versions (in backups they made, and in a
/// DATA_DIR this version has not started on yet).
const LEGACY_JOURNAL: &str = "location.db";

/// The SQLite files of the embedded store: (name in the backup, path in DATA_DIR).
fn databases(cfg: &Config) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    if let DbUrl::Sqlite(path) = &cfg.db_url {
        out.push(("careflow.db", path.clone()));
    }
    if cfg.redis_url.is_none() {
        out.push((LEGACY_JOURNAL, cfg.legacy_location_path()));
    }
    out
}

/// Copies the registration journal while the server may append to it; the copy ends after
/// its last whole record. Returns the number of records.
fn copy_journal(from: &Path, to: &Path) -> anyhow::Result<usize> {
    std::fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
    let r = careflow_store::location::check_journal(to)?;
    if r.discarded > 0 {
        // A record being appended while we copied.
        std::fs::OpenOptions::new()
            .write(true)
            .open(to)
            .and_then(|f| f.set_len(r.good_len))
            .with_context(|| format!("cannot write {}", to.display()))?;
    }
    Ok(r.records)
}

fn schema_version(db: &Path) -> anyhow::Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {}", db.display()))?;
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .with_context(|| format!("{} is not an SQLite database", db.display()))?;
    if ok != "ok" {
        bail!("{} is damaged: {ok}", db.display());
    }
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )
    .with_context(|| format!("{} has no careflow-sip schema", db.display()))
}

fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// `careflow-sip backup DIR`.
pub(crate) fn backup(cfg: &Config, dest: &Path) -> anyhow::Result<()> {
    if dest.exists()
        && std::fs::read_dir(dest)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty: back up into a new directory",
            dest.display()
        );
    }
    // It holds password digests, the nonce secret and maybe a TLS key.
    private_dir(dest)?;
    let mut manifest = format!(
        "careflow-sip {} backup\ncreated_unix {}\n",
        env!("CARGO_PKG_VERSION"),
        careflow_server::unix_now()
    );
    let dbs = databases(cfg);
    for (name, path) in &dbs {
        if !path.exists() {
            continue;
        }
        let target = dest.join(name);
        let conn = rusqlite::Connection::open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // A consistent copy even while the server writes (a read transaction).
        conn.execute("VACUUM INTO ?1", [target.to_string_lossy().as_ref()])
            .with_context(|| format!("cannot copy {}", path.display()))?;
        let v = schema_version(&target)?;
        manifest.push_str(&format!("{name} schema {v}\n"));
        println!("{name}: copied (schema version {v})");
    }
    let journal = cfg.location_path();
    if cfg.redis_url.is_none() && journal.exists() {
        let records = copy_journal(&journal, &dest.join(JOURNAL))?;
        manifest.push_str(&format!("{JOURNAL} records {records}\n"));
        println!("{JOURNAL}: copied ({records} records)");
    }
    for name in PLAIN_FILES {
        let src = cfg.data_dir.join(name);
        if src.exists() {
            std::fs::copy(&src, dest.join(name))
                .with_context(|| format!("cannot copy {}", src.display()))?;
            manifest.push_str(&format!("{name}\n"));
            println!("{name}: copied");
        }
    }
    if !matches!(cfg.db_url, DbUrl::Sqlite(_)) {
        println!(
            "subscribers live in the database of DB_URL: back it up with its own tools (pg_dump, mariadb-dump)"
        );
    }
    if cfg.redis_url.is_some() {
        println!("registrations live in Redis (REDIS_URL): they are not in this backup");
    }
    std::fs::write(dest.join(MANIFEST), manifest)?;
    println!("backup written to {}", dest.display());
    Ok(())
}

/// `careflow-sip restore DIR`: the server must be stopped.
pub(crate) fn restore(cfg: &Config, src: &Path) -> anyhow::Result<()> {
    if !src.join(MANIFEST).exists() {
        bail!(
            "{} is not a careflow-sip backup (no {MANIFEST})",
            src.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(crate::control::socket_path(cfg)).is_ok() {
        bail!("the server is running on this DATA_DIR: stop it before restoring");
    }
    let (subscriber_schema, location_schema) = careflow_store::schema_versions();
    // Check everything before touching anything.
    let mut plan = Vec::new();
    for (name, path) in databases(cfg) {
        let from = src.join(name);
        if !from.exists() {
            continue;
        }
        let v = schema_version(&from)?;
        let newest = if name == "careflow.db" {
            subscriber_schema
        } else {
            location_schema
        };
        if v > newest {
            bail!(
                "{name} has schema version {v}, newer than this careflow-sip knows ({newest}): restore with the version that made it"
            );
        }
        if name == LEGACY_JOURNAL {
            // A backup made before the journal was a plain file: the server imports it on
            // start, unless a journal is there; that one is set aside.
            plan.push((None, cfg.location_path()));
        }
        plan.push((Some(from), path));
    }
    let journal = src.join(JOURNAL);
    if journal.exists() && cfg.redis_url.is_none() {
        let r = careflow_store::location::check_journal(&journal)?;
        if r.discarded > 0 {
            bail!(
                "{} is damaged after record {}: {} bytes cannot be read",
                journal.display(),
                r.records,
                r.discarded
            );
        }
        plan.push((Some(journal), cfg.location_path()));
    }
    for name in PLAIN_FILES {
        let from = src.join(name);
        if from.exists() {
            plan.push((Some(from), cfg.data_dir.join(name)));
        }
    }
    if plan.is_empty() {
        bail!("{} holds nothing this configuration uses", src.display());
    }
    private_dir(&cfg.data_dir)?;
    let stamp = careflow_server::unix_now();
    for (from, to) in &plan {
        // What is replaced is kept beside it, with SQLite's side files.
        for suffix in ["", "-wal", "-shm"] {
            let old = PathBuf::from(format!("{}{suffix}", to.display()));
            if old.exists() {
                let kept = PathBuf::from(format!("{}.before-restore-{stamp}", old.display()));
                std::fs::rename(&old, &kept)
                    .with_context(|| format!("cannot move {} aside", old.display()))?;
            }
        }
        let Some(from) = from else { continue };
        std::fs::copy(from, to).with_context(|| format!("cannot write {}", to.display()))?;
        println!("{}: restored", to.display());
    }
    println!(
        "restore complete; replaced files were kept as *.before-restore-{stamp}; start the server (migrations run on start)"
    );
    Ok(())
}
