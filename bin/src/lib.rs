//! careflow-sip: command line, configuration loading and server start-up.

mod apikeys;
mod audit;
mod backup;
pub mod config;
mod control;
mod devices;
mod serve;
mod subscriber_cache;
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
    /// Exit 0 when the server of this configuration answers /healthz (for container and
    /// orchestrator health checks).
    Healthcheck,
    /// Manage subscribers.
    #[command(subcommand)]
    User(users::UserCommand),
    /// Manage admin API keys for /api/admin.
    #[command(subcommand)]
    Apikey(apikeys::ApiKeyCommand),
    /// Manage provisioned desk phones (auto-provisioning).
    #[command(subcommand)]
    Device(devices::DeviceCommand),
    /// Verify the audit trail's hash chain, or make a signed checkpoint of it.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
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

/// `careflow-sip healthcheck`: GET /healthz on HTTP_LISTEN (its loopback when it listens on
/// every address); no HTTP client needed in a slim container.
fn healthcheck(listen: std::net::SocketAddr) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let timeout = std::time::Duration::from_secs(3);
    let answer = std::net::TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    match answer {
        Ok(a) if a.starts_with("HTTP/1.1 200") => {
            println!("healthy");
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!(
                "careflow-sip: unhealthy: {}",
                a.lines().next().unwrap_or("no answer")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("careflow-sip: unhealthy: cannot reach {addr}: {e}");
            ExitCode::FAILURE
        }
    }
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
    if let Command::Healthcheck = cli.command {
        return healthcheck(config.http_listen);
    }
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
            Command::Serve => serve::run(config, cli.config.clone()).await,
            Command::CheckConfig | Command::Healthcheck => Ok(()),
            Command::User(cmd) => users::run(&config, cmd).await,
            Command::Apikey(cmd) => apikeys::run(&config, cmd).await,
            Command::Device(cmd) => devices::run(&config, cmd).await,
            Command::Audit(cmd) => audit::run(&config, cmd).await,
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
