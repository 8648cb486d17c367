//! careflow-sip: command line, configuration loading and server start-up.

mod apikeys;
mod backup;
pub mod config;
mod control;
mod serve;
mod users;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// SIP registrar and proxy for CareFlow.
#[derive(Debug, Parser)]
#[command(name = "careflow-sip", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file; environment variables override its keys.
    #[arg(long, global = true, value_name = "PATH", env = "CAREFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the SIP server and its HTTP endpoint until SIGINT/SIGTERM.
    Serve,
    /// Check the configuration (file and environment) and report every problem at once.
    CheckConfig,
    /// Manage subscribers.
    #[command(subcommand)]
    User(users::UserCommand),
    /// Manage admin API keys for /api/admin.
    #[command(subcommand)]
    Apikey(apikeys::ApiKeyCommand),
    /// List the sources the running server has banned.
    Bans,
    /// Lift a ban on the running server.
    Unban {
        /// The banned IP address.
        ip: String,
    },
    /// Show current registrations (all, or one user's).
    Registrations {
        /// Username (in SIP_DOMAIN) or user@domain.
        user: Option<String>,
    },
    /// Copy the embedded store (subscribers, API keys, registrations, secret, generated
    /// certificate) into a new directory; safe while the server runs.
    Backup {
        /// A new (or empty) directory.
        dir: PathBuf,
    },
    /// Put a backup back into DATA_DIR (the server must be stopped; replaced files are kept).
    Restore {
        /// A directory written by `careflow-sip backup`.
        dir: PathBuf,
    },
}

/// `careflow-sip check-config`: every problem of the configuration, then the files it names.
fn check_config(path: Option<&std::path::Path>) -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let mut problems: Vec<String> = Config::check(path, env)
        .iter()
        .map(ToString::to_string)
        .collect();
    if problems.is_empty()
        && let Ok(cfg) = Config::load(path, env)
    {
        if let Some((cert, key)) = &cfg.tls_files {
            let settings = cfg.tls_settings(cert.clone(), key.clone());
            if let Err(e) = careflow_transport::tls::TlsServer::new(settings) {
                problems.push(format!("TLS_CERT / TLS_KEY: {e}"));
            }
        }
        if let Err(e) = std::fs::create_dir_all(&cfg.data_dir) {
            problems.push(format!(
                "DATA_DIR {} cannot be created: {e}",
                cfg.data_dir.display()
            ));
        }
        if problems.is_empty() {
            println!(
                "configuration OK: domain {}, {} SIP listener(s), HTTP on {}, data in {}",
                cfg.sip_domain,
                cfg.sip_listen.len(),
                cfg.http_listen,
                cfg.data_dir.display()
            );
            return ExitCode::SUCCESS;
        }
    }
    for p in &problems {
        eprintln!("careflow-sip: configuration error: {p}");
    }
    eprintln!("{} problem(s) found", problems.len());
    ExitCode::from(2)
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CheckConfig = cli.command {
        return check_config(cli.config.as_deref());
    }
    let config = match Config::load(cli.config.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("careflow-sip: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("careflow-sip: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve => serve::run(config).await,
            Command::CheckConfig => Ok(()),
            Command::User(cmd) => users::run(&config, cmd).await,
            Command::Apikey(cmd) => apikeys::run(&config, cmd).await,
            Command::Bans => control::bans(&config).await,
            Command::Unban { ip } => control::unban(&config, &ip).await,
            Command::Registrations { user } => users::registrations(&config, user.as_deref()).await,
            Command::Backup { dir } => backup::backup(&config, &dir),
            Command::Restore { dir } => backup::restore(&config, &dir),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("careflow-sip: {e:#}");
            ExitCode::FAILURE
        }
    }
}
