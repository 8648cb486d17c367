//! `careflow-sip user ...` and `careflow-sip registrations`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use careflow_proto::digest::{Algorithm, ha1};
use careflow_store::sqlite::DbUrl;
use careflow_store::{NewSubscriber, StoreError};
use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Add a subscriber. Without --password a strong one is generated and printed once.
    Add {
        /// Username.
        user: String,
        /// Domain (default: SIP_DOMAIN).
        #[arg(long)]
        domain: Option<String>,
        /// Password (avoid: it lands in shell history; prefer the generated one).
        #[arg(long)]
        password: Option<String>,
        /// E-mail address.
        #[arg(long)]
        email: Option<String>,
    },
    /// List subscribers.
    List,
    /// Set a new password (generated and printed once without --password).
    Passwd {
        /// Username.
        user: String,
        /// Domain (default: SIP_DOMAIN).
        #[arg(long)]
        domain: Option<String>,
        /// New password.
        #[arg(long)]
        password: Option<String>,
    },
    /// Disable a subscriber: it can no longer authenticate.
    Disable {
        /// Username.
        user: String,
        /// Domain (default: SIP_DOMAIN).
        #[arg(long)]
        domain: Option<String>,
    },
    /// Enable a disabled subscriber.
    Enable {
        /// Username.
        user: String,
        /// Domain (default: SIP_DOMAIN).
        #[arg(long)]
        domain: Option<String>,
    },
    /// Remove a subscriber.
    Remove {
        /// Username.
        user: String,
        /// Domain (default: SIP_DOMAIN).
        #[arg(long)]
        domain: Option<String>,
    },
    /// Import subscribers from CSV: `username,password[,email]` rows (passwords are hashed, not
    /// stored) or `username,realm,ha1_md5,ha1_sha256` rows. All rows or none are imported.
    Import {
        /// CSV file.
        file: PathBuf,
        /// Domain for password rows (default: SIP_DOMAIN).
        #[arg(long)]
        domain: Option<String>,
    },
    /// Import the `subscriber` table of a Kamailio set-up (MySQL/MariaDB): plain passwords are
    /// hashed and not kept, rows with only an HA1 keep it (MD5 only until the password is next
    /// set). Users that exist already are left alone. Safe to run again.
    ImportKamailio {
        /// The Kamailio database, `mysql://USER:PASS@HOST[:PORT]/DB`.
        url: String,
        /// Its subscriber table.
        #[arg(long, default_value = "subscriber")]
        table: String,
        /// Import the rows of this domain (default: SIP_DOMAIN); others are listed as skipped.
        #[arg(long)]
        domain: Option<String>,
        /// Show what would be imported without writing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

pub(crate) async fn open_subscribers(
    cfg: &Config,
) -> anyhow::Result<std::sync::Arc<dyn careflow_store::Database>> {
    careflow_store::open_database(&cfg.db_url)
        .await
        .with_context(|| match &cfg.db_url {
            DbUrl::Sqlite(path) => format!("cannot open subscriber database {}", path.display()),
            DbUrl::Postgres(_) | DbUrl::Mysql(_) => {
                "cannot open the subscriber database of DB_URL".to_string()
            }
        })
}

pub(crate) async fn run(cfg: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    // Which rows a running server may hold that this command changes (`None`: any).
    let changed = match &cmd {
        UserCommand::Passwd { user, domain, .. }
        | UserCommand::Disable { user, domain }
        | UserCommand::Enable { user, domain }
        | UserCommand::Remove { user, domain } => {
            Some(Some((user.clone(), domain_or_default(cfg, domain.clone()))))
        }
        UserCommand::Import { .. } | UserCommand::ImportKamailio { .. } => Some(None),
        _ => None,
    };
    run_command(cfg, cmd).await?;
    if let Some(who) = changed {
        crate::control::subscribers_changed(cfg, who).await;
    }
    Ok(())
}

/// The domain a user command names, else SIP_DOMAIN; lower case.
fn domain_or_default(cfg: &Config, domain: Option<String>) -> String {
    domain
        .unwrap_or_else(|| cfg.sip_domain.clone())
        .to_ascii_lowercase()
}

async fn run_command(cfg: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    let store = open_subscribers(cfg).await?;
    let dom = |d: Option<String>| domain_or_default(cfg, d);
    match cmd {
        UserCommand::Add {
            user,
            domain,
            password,
            email,
        } => {
            let domain = dom(domain);
            check_username(&user)?;
            let (password, generated) = password_or_generate(password)?;
            let (md5, sha) = hashes(&user, &domain, &password);
            store
                .add(NewSubscriber {
                    username: user.clone(),
                    domain: domain.clone(),
                    email,
                    careflow_user_id: None,
                    careflow_care4w_id: None,
                    ha1_md5: md5,
                    ha1_sha256: sha,
                })
                .await
                .map_err(|e| match e {
                    StoreError::Conflict(_) => {
                        anyhow::anyhow!("user {user}@{domain} exists already")
                    }
                    other => other.into(),
                })?;
            crate::audit::record(
                &*store,
                "credentials.created",
                &format!("{user}@{domain}"),
                if generated {
                    "password generated, shown once".to_string()
                } else {
                    "password given".to_string()
                },
            )
            .await?;
            println!("added {user}@{domain}");
            if generated {
                println!("password (shown once, not stored): {password}");
            }
        }
        UserCommand::List => {
            let all = store.list().await?;
            println!("{:<32} {:<24} {:<8} EMAIL", "USERNAME", "DOMAIN", "ENABLED");
            for s in &all {
                println!(
                    "{:<32} {:<24} {:<8} {}",
                    s.username,
                    s.domain,
                    if s.enabled { "yes" } else { "no" },
                    s.email.as_deref().unwrap_or("-")
                );
            }
            println!("{} subscriber(s)", all.len());
        }
        UserCommand::Passwd {
            user,
            domain,
            password,
        } => {
            let domain = dom(domain);
            let (password, generated) = password_or_generate(password)?;
            let (md5, sha) = hashes(&user, &domain, &password);
            if !store.set_ha1(&user, &domain, &md5, &sha).await? {
                bail!("no user {user}@{domain}");
            }
            crate::audit::record(
                &*store,
                "credentials.rotated",
                &format!("{user}@{domain}"),
                String::new(),
            )
            .await?;
            println!("password changed for {user}@{domain}");
            if generated {
                println!("password (shown once, not stored): {password}");
            }
        }
        UserCommand::Disable { user, domain } => {
            let domain = dom(domain);
            if !store.set_enabled(&user, &domain, false).await? {
                bail!("no user {user}@{domain}");
            }
            crate::audit::record(
                &*store,
                "subscriber.disabled",
                &format!("{user}@{domain}"),
                String::new(),
            )
            .await?;
            println!("disabled {user}@{domain}");
        }
        UserCommand::Enable { user, domain } => {
            let domain = dom(domain);
            if !store.set_enabled(&user, &domain, true).await? {
                bail!("no user {user}@{domain}");
            }
            crate::audit::record(
                &*store,
                "subscriber.enabled",
                &format!("{user}@{domain}"),
                String::new(),
            )
            .await?;
            println!("enabled {user}@{domain}");
        }
        UserCommand::Remove { user, domain } => {
            let domain = dom(domain);
            if !store.remove(&user, &domain).await? {
                bail!("no user {user}@{domain}");
            }
            crate::audit::record(
                &*store,
                "credentials.revoked",
                &format!("{user}@{domain}"),
                "subscriber removed".to_string(),
            )
            .await?;
            println!("removed {user}@{domain}");
        }
        UserCommand::ImportKamailio {
            url,
            table,
            domain,
            dry_run,
        } => {
            import_kamailio(&*store, &url, &table, &dom(domain), dry_run).await?;
        }
        UserCommand::Import { file, domain } => {
            let domain = dom(domain);
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let rows = parse_import(&text, &domain)?;
            let started = std::time::Instant::now();
            let n = store.import(rows).await?;
            crate::audit::record(
                &*store,
                "credentials.imported",
                &domain,
                format!("{n} subscribers from {}", file.display()),
            )
            .await?;
            println!(
                "imported {n} subscriber(s) in {:.2}s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// How one Kamailio row is imported: the subscriber and whether its password was known.
pub(crate) fn from_kamailio(
    row: &careflow_store::kamailio::KamailioSubscriber,
    domain: &str,
) -> Result<(NewSubscriber, bool), String> {
    check_username(&row.username).map_err(|e| e.to_string())?;
    let row_domain = row.domain.to_ascii_lowercase();
    if row_domain != domain {
        return Err(format!(
            "domain `{row_domain}` is not `{domain}` (run again with --domain {row_domain})"
        ));
    }
    let base = NewSubscriber {
        username: row.username.clone(),
        domain: domain.to_string(),
        email: row.email.clone(),
        careflow_user_id: row.careflow_user_id.clone(),
        careflow_care4w_id: row.careflow_care4w_id.clone(),
        ha1_md5: String::new(),
        ha1_sha256: String::new(),
    };
    if let Some(pw) = row.password.as_deref() {
        let (md5, sha) = hashes(&row.username, domain, pw);
        return Ok((
            NewSubscriber {
                ha1_md5: md5,
                ha1_sha256: sha,
                ..base
            },
            true,
        ));
    }
    match row.ha1.as_deref() {
        Some(h) if is_hex(h, 32) => Ok((
            NewSubscriber {
                ha1_md5: h.to_ascii_lowercase(),
                ..base
            },
            false,
        )),
        Some(_) => Err("its ha1 is not an MD5 digest (32 hex digits)".into()),
        None => Err("it has neither a password nor an ha1".into()),
    }
}

async fn import_kamailio(
    store: &dyn careflow_store::Database,
    url: &str,
    table: &str,
    domain: &str,
    dry_run: bool,
) -> anyhow::Result<()> {
    let rows = careflow_store::kamailio::read_mysql(url, table)
        .await
        .context("cannot read the Kamailio subscriber table")?;
    let (mut new, mut skipped) = (Vec::new(), Vec::new());
    let (mut from_password, mut from_ha1) = (0, 0);
    for row in &rows {
        let who = format!("{}@{}", row.username, row.domain);
        match from_kamailio(row, domain) {
            Ok((sub, password)) => {
                if store.find(&sub.username, &sub.domain).await?.is_some() {
                    skipped.push((who, "exists already".to_string()));
                    continue;
                }
                if password {
                    from_password += 1;
                } else {
                    from_ha1 += 1;
                }
                new.push(sub);
            }
            Err(why) => skipped.push((who, why)),
        }
    }
    let n = if dry_run {
        new.len()
    } else {
        store.import(new).await?
    };
    println!(
        "{} {n} of {} subscriber(s): {from_password} from plain passwords (hashed; the passwords were not kept), {from_ha1} with their HA1 only (MD5; SHA-256 once their password is next set)",
        if dry_run { "would import" } else { "imported" },
        rows.len()
    );
    for (who, why) in &skipped {
        println!("skipped {who}: {why}");
    }
    Ok(())
}

pub(crate) async fn registrations(cfg: &Config, user: Option<&str>) -> anyhow::Result<()> {
    let now = careflow_server::unix_now();
    let all = match &cfg.redis_url {
        Some(url) => {
            use careflow_store::LocationStore as _;
            careflow_store::redis::RedisLocation::open(url, "cli".into())
                .await
                .context("cannot connect to REDIS_URL")?
                .all(now)
                .await?
        }
        None => careflow_store::location::read_journal(
            &cfg.location_path(),
            Some(&cfg.legacy_location_path()),
            now,
        )?,
    };
    let filter = user.map(|u| {
        if u.contains('@') {
            u.to_string()
        } else {
            format!("{u}@{}", cfg.sip_domain)
        }
    });
    let rows: Vec<_> = all
        .iter()
        .filter(|b| filter.as_deref().is_none_or(|f| b.aor == f))
        .collect();
    println!(
        "{:<32} {:<48} {:<9} {:<24} {:<24} {:<10} NODE",
        "AOR", "CONTACT", "TRANSPORT", "SOURCE", "USER_AGENT", "EXPIRES_IN"
    );
    for b in &rows {
        println!(
            "{:<32} {:<48} {:<9} {:<24} {:<24} {:<10} {}",
            b.aor,
            careflow_core::push::redacted(&b.contact),
            b.transport,
            b.source,
            b.user_agent.as_deref().unwrap_or("-"),
            format!("{}s", b.expires_in(now)),
            b.owner_node().as_deref().unwrap_or("-")
        );
    }
    println!("{} binding(s)", rows.len());
    Ok(())
}

fn check_username(user: &str) -> anyhow::Result<()> {
    // RFC 3261 user part without escapes: unreserved characters and a few marks.
    if user.is_empty()
        || user.len() > 64
        || !user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$,;?/".contains(&b))
    {
        bail!("invalid username `{user}`: use letters, digits and - _ . (at most 64)");
    }
    Ok(())
}

fn hashes(user: &str, realm: &str, password: &str) -> (String, String) {
    (
        ha1(Algorithm::Md5, user, realm, password),
        ha1(Algorithm::Sha256, user, realm, password),
    )
}

/// 22 characters from a 62-symbol alphabet: 130 bits of entropy.
pub(crate) fn generate_password() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(22);
    while out.len() < 22 {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        // Rejection sampling keeps every symbol equally likely (248 = 4 * 62).
        for b in buf {
            if b < 248 && out.len() < 22 {
                out.push(ALPHABET[usize::from(b % 62)] as char);
            }
        }
    }
    Ok(out)
}

fn password_or_generate(p: Option<String>) -> anyhow::Result<(String, bool)> {
    match p {
        Some(p) if p.is_empty() => bail!("--password must not be empty"),
        Some(p) => Ok((p, false)),
        None => Ok((generate_password()?, true)),
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses an import file; any bad row fails the whole import, naming the line.
pub(crate) fn parse_import(text: &str, domain: &str) -> anyhow::Result<Vec<NewSubscriber>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if i == 0 && (f[0].eq_ignore_ascii_case("username") || f[0].eq_ignore_ascii_case("user")) {
            continue;
        }
        let n = i + 1;
        let row = if f.len() == 4 && is_hex(f[2], 32) && is_hex(f[3], 64) {
            NewSubscriber {
                username: f[0].to_string(),
                domain: f[1].to_ascii_lowercase(),
                email: None,
                careflow_user_id: None,
                careflow_care4w_id: None,
                ha1_md5: f[2].to_ascii_lowercase(),
                ha1_sha256: f[3].to_ascii_lowercase(),
            }
        } else if f.len() == 2 || f.len() == 3 {
            if f[1].is_empty() {
                bail!("line {n}: empty password");
            }
            let (md5, sha) = hashes(f[0], domain, f[1]);
            NewSubscriber {
                username: f[0].to_string(),
                domain: domain.to_string(),
                email: f.get(2).filter(|e| !e.is_empty()).map(|e| e.to_string()),
                careflow_user_id: None,
                careflow_care4w_id: None,
                ha1_md5: md5,
                ha1_sha256: sha,
            }
        } else {
            bail!(
                "line {n}: expected `username,password[,email]` or `username,realm,ha1_md5,ha1_sha256`"
            );
        };
        check_username(&row.username).with_context(|| format!("line {n}"))?;
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_and_distinct() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn kamailio_rows_keep_what_can_be_kept() {
        use careflow_store::kamailio::KamailioSubscriber;
        let plain = KamailioSubscriber {
            username: "anna".into(),
            domain: "Clinic.Example".into(),
            password: Some("pw".into()),
            email: Some("a@x".into()),
            ..Default::default()
        };
        let (s, from_password) = from_kamailio(&plain, "clinic.example").unwrap();
        assert!(from_password);
        assert_eq!(
            s.ha1_md5,
            ha1(Algorithm::Md5, "anna", "clinic.example", "pw")
        );
        assert_eq!(s.ha1_sha256.len(), 64);
        assert_eq!(s.email.as_deref(), Some("a@x"));
        let digest = ha1(Algorithm::Md5, "ben", "clinic.example", "x").to_uppercase();
        let only_ha1 = KamailioSubscriber {
            username: "ben".into(),
            domain: "clinic.example".into(),
            ha1: Some(digest.clone()),
            ..Default::default()
        };
        let (s, from_password) = from_kamailio(&only_ha1, "clinic.example").unwrap();
        assert!(!from_password);
        assert_eq!(s.ha1_md5, digest.to_lowercase());
        assert!(s.ha1_sha256.is_empty());
        assert!(from_kamailio(&only_ha1, "other.example").is_err());
        let bad = KamailioSubscriber {
            ha1: Some("not-hex".into()),
            ..only_ha1.clone()
        };
        assert!(from_kamailio(&bad, "clinic.example").is_err());
        let bad_name = KamailioSubscriber {
            username: "a b".into(),
            ..plain
        };
        assert!(from_kamailio(&bad_name, "clinic.example").is_err());
    }

    #[test]
    fn import_formats() {
        let rows = parse_import(
            "username,password,email\nalice,pw1,a@example.com\nbob,pw2\n",
            "example.com",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].ha1_md5,
            ha1(Algorithm::Md5, "alice", "example.com", "pw1")
        );
        assert_eq!(rows[0].email.as_deref(), Some("a@example.com"));
        let h = format!(
            "username,realm,ha1_md5,ha1_sha256\nuser1,bench.local,{},{}\n",
            ha1(Algorithm::Md5, "user1", "bench.local", "x"),
            ha1(Algorithm::Sha256, "user1", "bench.local", "x")
        );
        let rows = parse_import(&h, "ignored").unwrap();
        assert_eq!(rows[0].domain, "bench.local");
        let e = parse_import("alice,pw\nbad line with no commas\n", "d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
