//! `careflow-sip audit verify|checkpoint`: the audit trail's hash chain checked end to end,
//! and signed checkpoints to keep elsewhere (issue 20); and the entries of the CLI's own
//! actions.
//!
//! A checkpoint is the chain's newest `(seq, hash)` signed with an Ed25519 key kept in
//! `DATA_DIR/audit-signing.pk8` (made on first use, readable by the service user only). Kept
//! outside the database, it catches what the chain alone cannot: the newest entries removed,
//! or the whole chain rewritten with fresh hashes.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use careflow_core::audit::{AuditEvent, Verifier};
use careflow_store::audit::AuditStore;
use clap::Subcommand;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};

use crate::config::Config;
use crate::users::open_subscribers;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the whole chain; exits 1 naming the first edited, removed or reordered entry.
    Verify {
        /// Also check the chain against checkpoints made by `audit checkpoint` (files).
        #[arg(long)]
        checkpoint: Vec<PathBuf>,
        /// The hex Ed25519 public key the checkpoints must be signed with (as printed by
        /// `audit checkpoint`); without it, each checkpoint's own key is trusted.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Print a signed checkpoint of the chain's newest entry (JSON, to keep elsewhere).
    Checkpoint,
}

/// Entries read per page while verifying.
const PAGE: usize = 5_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Who runs the CLI, for the trail.
fn cli_actor() -> String {
    match std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")) {
        Ok(u) if !u.is_empty() => format!("cli:{u}"),
        _ => "cli".to_string(),
    }
}

/// Appends an entry for an action of the CLI. A trail that cannot be written fails the
/// command after the action (the operator sees it).
pub(crate) async fn record(
    store: &dyn AuditStore,
    action: &str,
    target: &str,
    detail: String,
) -> anyhow::Result<()> {
    let event = AuditEvent {
        actor: cli_actor(),
        source: "local".to_string(),
        action: action.to_string(),
        target: target.to_string(),
        outcome: "ok".to_string(),
        detail,
    };
    store
        .append_audit(now_ms(), event)
        .await
        .context("the action was done, but the audit trail could not be written")?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    careflow_proto::digest::hex(b)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a checkpoint signs.
fn signed_text(seq: u64, hash: &str, at: u64) -> String {
    format!("careflow-sip audit checkpoint\n{seq}\n{hash}\n{at}\n")
}

fn signing_key(path: &Path) -> anyhow::Result<Ed25519KeyPair> {
    if !path.exists() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
        write_private(path, pkcs8.as_ref())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ed25519KeyPair::from_pkcs8(&bytes)
        .map_err(|_| anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key", path.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

pub(crate) async fn run(cfg: &Config, cmd: AuditCommand) -> anyhow::Result<()> {
    let store = open_subscribers(cfg).await?;
    match cmd {
        AuditCommand::Verify {
            checkpoint,
            public_key,
        } => verify(&*store, &checkpoint, public_key.as_deref()).await,
        AuditCommand::Checkpoint => {
            let (seq, hash) = head(&*store).await?;
            let at = now_ms();
            let key = signing_key(&cfg.data_dir.join("audit-signing.pk8"))?;
            let sig = key.sign(signed_text(seq, &hash, at).as_bytes());
            let out = serde_json::json!({
                "seq": seq,
                "hash": hash,
                "at": at,
                "publicKey": hex(key.public_key().as_ref()),
                "signature": hex(sig.as_ref()),
            });
            record(&*store, "audit.checkpoint", &seq.to_string(), hash.clone()).await?;
            println!("{out}");
            Ok(())
        }
    }
}

/// Verifies the chain (and checkpoints); the newest `(seq, hash)`.
async fn head(store: &dyn AuditStore) -> anyhow::Result<(u64, String)> {
    let mut v = Verifier::default();
    let mut after = 0;
    loop {
        let page = store
            .audit_after(after, PAGE)
            .await
            .context("cannot read the audit trail")?;
        for e in &page {
            if let Err(broken) = v.check(e) {
                bail!("the audit trail is broken: {broken}");
            }
        }
        match page.last() {
            Some(e) if page.len() == PAGE => after = e.seq,
            _ => break,
        }
    }
    Ok(v.head()
        .map(|(s, h)| (s, h.to_string()))
        .unwrap_or((0, careflow_core::audit::GENESIS.to_string())))
}

async fn verify(
    store: &dyn AuditStore,
    checkpoints: &[PathBuf],
    pinned: Option<&str>,
) -> anyhow::Result<()> {
    let (seq, hash) = head(store).await?;
    for path in checkpoints {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let cp: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("checkpoint {} is not JSON", path.display()))?;
        let field = |k: &str| {
            cp.get(k)
                .with_context(|| format!("checkpoint {} has no `{k}`", path.display()))
        };
        let cp_seq = field("seq")?.as_u64().context("`seq` is not a number")?;
        let cp_hash = field("hash")?.as_str().context("`hash` is not text")?;
        let cp_at = field("at")?.as_u64().context("`at` is not a number")?;
        let key = field("publicKey")?
            .as_str()
            .context("`publicKey` is not text")?;
        if pinned.is_some_and(|p| !p.eq_ignore_ascii_case(key)) {
            bail!("checkpoint {} is signed by another key", path.display());
        }
        let sig = field("signature")?
            .as_str()
            .and_then(unhex)
            .context("`signature` is not hex")?;
        signature::UnparsedPublicKey::new(
            &signature::ED25519,
            unhex(key).context("`publicKey` is not hex")?,
        )
        .verify(signed_text(cp_seq, cp_hash, cp_at).as_bytes(), &sig)
        .map_err(|_| {
            anyhow::anyhow!(
                "checkpoint {}: the signature does not match",
                path.display()
            )
        })?;
        if cp_seq == 0 {
            continue;
        }
        if cp_seq > seq {
            bail!(
                "the audit trail ends at entry {seq} but checkpoint {} has entry {cp_seq}: entries {} to {cp_seq} were removed",
                path.display(),
                seq + 1
            );
        }
        let at = store
            .audit_after(cp_seq.saturating_sub(1), 1)
            .await
            .context("cannot read the audit trail")?;
        match at.first() {
            Some(e) if e.seq == cp_seq && e.hash == cp_hash => {}
            Some(e) if e.seq == cp_seq => bail!(
                "entry {cp_seq} is not the one checkpoint {} signed: the chain was rewritten up to there",
                path.display()
            ),
            _ => bail!("entry {cp_seq} of checkpoint {} is missing", path.display()),
        }
    }
    println!(
        "audit trail verified: {seq} entries, newest hash {hash}{}",
        match checkpoints.len() {
            0 => String::new(),
            n => format!(", {n} checkpoint(s) match"),
        }
    );
    Ok(())
}
