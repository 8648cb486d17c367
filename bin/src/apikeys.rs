//! `careflow-sip apikey create|list|revoke`: admin keys for `/api/admin/*`.

use anyhow::{Context as _, bail};
use careflow_store::StoreError;
use clap::Subcommand;

use crate::config::Config;
use crate::users::open_subscribers;

#[derive(Debug, Subcommand)]
pub(crate) enum ApiKeyCommand {
    /// Create a key; it is printed once, alone on the last line (only its digest is stored).
    Create {
        /// A unique name saying who or what uses it.
        name: String,
    },
    /// List keys (names and dates; keys cannot be shown again).
    List,
    /// Revoke a key by name.
    Revoke {
        /// The key's name.
        name: String,
    },
}

pub(crate) async fn run(cfg: &Config, cmd: ApiKeyCommand) -> anyhow::Result<()> {
    let store = open_subscribers(cfg).await?;
    match cmd {
        ApiKeyCommand::Create { name } => {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_whitespace) {
                bail!("the name must be 1 to 64 characters without spaces");
            }
            let (key, digest) = careflow_api::auth::new_api_key().map_err(anyhow::Error::msg)?;
            match store.create_key(&name, &digest).await {
                Ok(()) => {}
                Err(StoreError::Conflict(_)) => bail!("an API key named `{name}` exists already"),
                Err(e) => return Err(e).context("cannot store the key"),
            }
            crate::audit::record(&*store, "apikey.created", &name, String::new()).await?;
            println!("created API key `{name}`; it is shown only now:");
            println!("{key}");
        }
        ApiKeyCommand::List => {
            for k in store.list_keys().await? {
                let state = match k.revoked_at {
                    Some(t) => format!("revoked at {t}"),
                    None => "active".to_string(),
                };
                println!("{}\tcreated at {}\t{state}", k.name, k.created_at);
            }
        }
        ApiKeyCommand::Revoke { name } => {
            if !store.revoke_key(&name).await? {
                bail!("no active API key named `{name}`");
            }
            crate::audit::record(&*store, "apikey.revoked", &name, String::new()).await?;
            println!("revoked API key `{name}`");
        }
    }
    Ok(())
}
