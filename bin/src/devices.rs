//! Desk phone provisioning (issue 21) on the binary's side: the device service from the
//! configuration (and its key file), the provisioning listeners, and
//! `careflow-sip device add|list|show|update|rotate|provisioning-password|remove`.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use careflow_api::devices::fetch::FetchServer;
use careflow_api::devices::files::SipServer;
use careflow_api::devices::{DeviceError, DeviceService, DeviceSettings, NewDevice, WithSecret};
use careflow_core::provisioning::{FetchLimits, ProvisioningKey};
use careflow_store::SubscriberStore;
use careflow_store::devices::{Device, DeviceStore};
use careflow_transport::Transport;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The device service of `cfg` (the provisioning key is read, or generated on first use).
pub(crate) fn service(
    cfg: &Config,
    store: Arc<dyn DeviceStore>,
    subscribers: Arc<dyn SubscriberStore>,
) -> anyhow::Result<DeviceService> {
    let p = &cfg.provision;
    let key = crate::serve::load_or_create_secret(&p.key_file, "provisioning key")
        .with_context(|| format!("PROVISION_KEY_FILE {}", p.key_file.display()))?;
    Ok(DeviceService {
        store,
        subscribers,
        domain: cfg.sip_domain.clone(),
        settings: Arc::new(DeviceSettings {
            key: ProvisioningKey::new(key),
            grace: p.grace,
            utc_offset_minutes: p.utc_offset_minutes,
            ntp_server: p.ntp_server.clone(),
            resync: p.resync,
            public_url: p.public_url.clone(),
            limits: FetchLimits {
                misses: p.misses,
                window: p.miss_window,
            },
            shared_by_default: p.shared_by_default,
        }),
    })
}

/// Binds and serves every `PROVISION_LISTEN` listener until `cancel`.
pub(crate) async fn serve_provisioning(
    cfg: &Config,
    devices: DeviceService,
    bound: &[careflow_transport::ListenSpec],
    audit: Arc<dyn careflow_store::audit::AuditStore>,
    secret: [u8; 32],
    tls: Option<&careflow_transport::tls::TlsServer>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    if cfg.provision.listen.is_empty() {
        return Ok(());
    }
    let internal = cfg.cluster.as_ref().map(|c| c.address);
    let port_of = |t: Transport| {
        bound
            .iter()
            .filter(|l| Some(l.addr) != internal)
            .find(|l| l.transport == t)
            .map(|l| l.addr.port())
    };
    let sip = SipServer {
        host: cfg.sip_domain.clone(),
        udp_port: port_of(Transport::Udp).unwrap_or(5060),
        tls_port: port_of(Transport::Tls),
    };
    let server = Arc::new(FetchServer::new(devices, sip, audit, secret));
    if let Some((interface, port)) = cfg.provision.pnp {
        let pnp = careflow_api::devices::pnp::PnpConfig { interface, port };
        let socket = careflow_api::devices::pnp::bind(pnp).with_context(|| {
            format!("PROVISION_PNP: cannot join 224.0.1.75:{port} on {interface}")
        })?;
        tracing::info!(%interface, port, "SIP PnP answers phones' multicast SUBSCRIBEs");
        let cancel = cancel.clone();
        tokio::spawn(careflow_api::devices::pnp::run(
            socket,
            pnp,
            server.clone(),
            async move { cancel.cancelled().await },
        ));
    }
    for (https, addr) in &cfg.provision.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on PROVISION_LISTEN {addr}"))?;
        let acceptor = match (https, tls) {
            (true, Some(t)) => Some(
                t.for_other_listener(cfg.provision.client_ca.as_deref())
                    .context("the provisioning listener's TLS (PROVISION_CLIENT_CA)")?
                    .acceptor(),
            ),
            (true, None) => bail!("PROVISION_LISTEN {addr}: https needs a TLS certificate"),
            (false, None | Some(_)) => None,
        };
        tracing::info!(%addr, https, "provisioning listener bound");
        let cancel = cancel.clone();
        tokio::spawn(careflow_api::devices::fetch::serve(
            listener,
            acceptor,
            server.clone(),
            async move { cancel.cancelled().await },
        ));
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeviceCommand {
    /// Bind a desk phone to a user: it gets its own SIP credentials, and provisioning
    /// credentials printed once.
    Add {
        /// MAC address (`00:15:65:aa:bb:cc` or `001565aabbcc`).
        mac: String,
        /// The user's SIP username.
        user: String,
        /// Model: yealink-t46s, yealink-t54w, yealink-t33g, cisco-spa303, cisco-spa504g,
        /// grandstream-gxp2170, grandstream-grp2614.
        #[arg(long)]
        model: String,
        /// Where it stands.
        #[arg(long)]
        label: Option<String>,
        /// Colleagues' SIP usernames for its busy-lamp keys, comma-separated.
        #[arg(long, value_delimiter = ',')]
        blf: Vec<String>,
        /// Share the user's own SIP credentials (sets the user's password to one derived for
        /// sharing, printed once) instead of its own.
        #[arg(long, conflicts_with = "own")]
        shared: bool,
        /// Its own SIP credentials, whatever DEVICE_CREDENTIALS says.
        #[arg(long)]
        own: bool,
    },
    /// List devices (all, or one user's).
    List {
        /// The user's SIP username.
        user: Option<String>,
    },
    /// Show one device.
    Show {
        /// MAC address.
        mac: String,
    },
    /// Change a device's model, label or busy lamps.
    Update {
        /// MAC address.
        mac: String,
        /// New model.
        #[arg(long)]
        model: Option<String>,
        /// New label (empty: none).
        #[arg(long)]
        label: Option<String>,
        /// New busy lamps, comma-separated (empty: none).
        #[arg(long, value_delimiter = ',')]
        blf: Option<Vec<String>>,
    },
    /// New SIP credentials: the next configuration fetch carries them, the previous ones
    /// work for DEVICE_ROTATION_GRACE more.
    Rotate {
        /// MAC address.
        mac: String,
    },
    /// A new provisioning password (the old one stops at once), printed once.
    ProvisioningPassword {
        /// MAC address.
        mac: String,
    },
    /// Remove a device: its credentials stop at once.
    Remove {
        /// MAC address.
        mac: String,
    },
}

fn describe(d: &Device) -> String {
    let previous = d
        .previous
        .as_ref()
        .map(|p| format!("\tprevious credentials until {}", p.valid_until))
        .unwrap_or_default();
    format!(
        "{}\t{}\t{}\tauth name {}{}\tgeneration {}\tlabel {}\tblf {}\tlast fetch {}{previous}",
        d.mac,
        d.model,
        d.username,
        DeviceService::sip_auth_name(d),
        if d.shared { " (shared)" } else { "" },
        d.generation,
        d.label.as_deref().unwrap_or("-"),
        if d.blf.is_empty() {
            "-".to_string()
        } else {
            d.blf.join(",")
        },
        d.last_fetch_at
            .map_or_else(|| "never".to_string(), |t| t.to_string()),
    )
}

fn print_secret(s: &DeviceService, w: &WithSecret) {
    println!("{}", describe(&w.device));
    println!("provisioning user name: {}", w.device.mac);
    println!(
        "provisioning password (shown only now): {}",
        w.provisioning_password
    );
    if let Some(pw) = &w.user_password {
        println!(
            "the user's SIP password is now (shown only now; their other clients need it): {pw}"
        );
    }
    match s.provisioning_url(&w.device.mac, &w.provisioning_password) {
        Some(url) => println!("provisioning URL for the phone: {url}"),
        None => println!("(set PROVISION_LISTEN or PROVISION_PUBLIC_URL for the provisioning URL)"),
    }
}

fn cli_error(e: DeviceError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

pub(crate) async fn run(cfg: &Config, cmd: DeviceCommand) -> anyhow::Result<()> {
    // A device sharing its user's credentials changes the user's HA1 when added or rotated.
    let writes = !matches!(cmd, DeviceCommand::List { .. } | DeviceCommand::Show { .. });
    run_command(cfg, cmd).await?;
    if writes {
        crate::control::subscribers_changed(cfg, None).await;
    }
    Ok(())
}

async fn run_command(cfg: &Config, cmd: DeviceCommand) -> anyhow::Result<()> {
    let db = crate::users::open_subscribers(cfg).await?;
    let s = service(cfg, db.clone(), db.clone())?;
    let audit = |action: &'static str, d: &Device, detail: String| {
        let db = db.clone();
        let target = format!("{}@{}", d.username, d.domain);
        async move { crate::audit::record(&*db, action, &target, detail).await }
    };
    match cmd {
        DeviceCommand::Add {
            mac,
            user,
            model,
            label,
            blf,
            shared,
            own,
        } => {
            let w = s
                .add(NewDevice {
                    mac,
                    model,
                    username: user,
                    label,
                    blf,
                    shared: (shared || own).then_some(shared),
                })
                .await
                .map_err(cli_error)?;
            audit(
                "device.added",
                &w.device,
                format!("mac={} model={}", w.device.mac, w.device.model),
            )
            .await?;
            print_secret(&s, &w);
        }
        DeviceCommand::List { user } => {
            let list = match &user {
                Some(u) => s.store.devices(Some((u, &cfg.sip_domain))).await?,
                None => s.store.devices(None).await?,
            };
            for d in &list {
                println!("{}", describe(d));
            }
        }
        DeviceCommand::Show { mac } => {
            println!("{}", describe(&s.get(&mac).await.map_err(cli_error)?))
        }
        DeviceCommand::Update {
            mac,
            model,
            label,
            blf,
        } => {
            let d = s
                .update(&mac, model, label.map(Some), blf)
                .await
                .map_err(cli_error)?;
            audit(
                "device.updated",
                &d,
                format!("mac={} model={}", d.mac, d.model),
            )
            .await?;
            println!("{}", describe(&d));
        }
        DeviceCommand::Rotate { mac } => {
            let r = s.rotate(&mac).await.map_err(cli_error)?;
            let d = r.device;
            audit(
                "device.rotated",
                &d,
                format!(
                    "mac={} generation={} shared={}",
                    d.mac, d.generation, d.shared
                ),
            )
            .await?;
            println!("{}", describe(&d));
            if let Some(pw) = r.user_password {
                println!(
                    "the user's new SIP password (shown only now; the previous one works for DEVICE_ROTATION_GRACE): {pw}"
                );
            }
        }
        DeviceCommand::ProvisioningPassword { mac } => {
            let w = s.new_provisioning_password(&mac).await.map_err(cli_error)?;
            audit(
                "device.provisioning_password_reset",
                &w.device,
                format!("mac={}", w.device.mac),
            )
            .await?;
            print_secret(&s, &w);
        }
        DeviceCommand::Remove { mac } => {
            let d = s.get(&mac).await.map_err(cli_error)?;
            s.remove(&d.mac).await.map_err(cli_error)?;
            audit("device.removed", &d, format!("mac={}", d.mac)).await?;
            println!("removed device {}", d.mac);
        }
    }
    Ok(())
}
