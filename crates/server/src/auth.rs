//! Digest authentication of requests (RFC 3261 §22), one path for both uses: REGISTER is
//! challenged by the registrar (401, `WWW-Authenticate`/`Authorization`), everything the proxy
//! forwards for our users by the proxy (407, `Proxy-Authenticate`/`Proxy-Authorization`).
//!
//! Two steps so the synchronous checks run on the receiving task and only a request with
//! plausible credentials waits for the store: [`Digest::prepare`] (credentials for our realm,
//! the identity, realm/algorithm/nonce), then [`Digest::verify`] (the subscriber's HA1). Both
//! say who failed in an [`AuthError`]; the log line, the metric and the brute-force count are
//! done here once, and [`Digest::answer`] turns the error into the response. A [`Digest`]
//! borrows only what authentication needs (`App::digest` lends one).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use careflow_core::auth::{Authenticator, Failure, Pending, Verdict};
use careflow_core::guard::Guard;
use careflow_proto::digest::Credentials;
use careflow_proto::{HeaderName, Message, ResponseBuilder};
use careflow_store::SubscriberStore;
use careflow_store::devices::DeviceStore;

use crate::app::{App, Ctx, to_tag};
use crate::metrics::Metrics;

/// Who authenticates: the registrar or the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Challenger {
    /// 401 with `WWW-Authenticate`; credentials in `Authorization`.
    Registrar,
    /// 407 with `Proxy-Authenticate`; credentials in `Proxy-Authorization`.
    Proxy,
}

impl Challenger {
    fn status(self) -> u16 {
        match self {
            Self::Registrar => 401,
            Self::Proxy => 407,
        }
    }

    fn challenge_header(self) -> &'static str {
        match self {
            Self::Registrar => "WWW-Authenticate",
            Self::Proxy => "Proxy-Authenticate",
        }
    }

    fn credentials_header(self) -> HeaderName {
        match self {
            Self::Registrar => HeaderName::Authorization,
            Self::Proxy => HeaderName::ProxyAuthorization,
        }
    }

    /// The 403 reason when the credentials are another user's than the request's.
    fn identity_reason(self) -> &'static str {
        match self {
            Self::Registrar => "Username Does Not Match AoR",
            Self::Proxy => "Username Does Not Match From",
        }
    }
}

/// Why a request is not authenticated, by who failed.
#[derive(Debug)]
pub(crate) enum AuthError {
    /// No credentials for our realm: the first challenge of every registration and call.
    Missing,
    /// The credentials are another user's than the one the request is for (403).
    WrongIdentity,
    /// The caller's credentials were not accepted: challenged again; `stale` when the digest
    /// was right and only the nonce was not fresh.
    Refused {
        /// `stale=true` in the new challenge.
        stale: bool,
    },
    /// The subscriber store could not answer (503): nobody is authenticated meanwhile. The
    /// store's error is logged where it happened.
    Store,
}

/// Credentials that passed the checks needing no store.
#[derive(Debug)]
pub(crate) struct Prepared<'m> {
    pub(crate) creds: Credentials<'m>,
    pending: Pending,
}

/// Digest authentication with only what it needs: the nonces and verification, the
/// subscriber store, the counters and the guard that counts guesses.
pub(crate) struct Digest<'a> {
    auth: &'a Authenticator,
    subscribers: &'a dyn SubscriberStore,
    devices: Option<&'a dyn DeviceStore>,
    metrics: &'a Metrics,
    guard: Option<&'a Guard>,
    server_header: &'a str,
}

impl App {
    /// The application's digest authentication.
    pub(crate) fn digest(&self) -> Digest<'_> {
        Digest {
            auth: &self.auth,
            subscribers: &*self.subscribers,
            devices: self.cfg.devices.as_ref().map(|d| &*d.0),
            metrics: &self.metrics,
            guard: self.cfg.guard.as_deref(),
            server_header: &self.cfg.server_header,
        }
    }
}

impl Digest<'_> {
    /// First step, synchronous: the credentials for `realm` in `challenger`'s header, naming
    /// `user`, with a realm, algorithm, qop and nonce we accept.
    pub(crate) fn prepare<'m>(
        &self,
        msg: &'m Message,
        ctx: &Ctx,
        challenger: Challenger,
        realm: &str,
        user: &str,
        now: u64,
    ) -> Result<Prepared<'m>, AuthError> {
        let creds = msg
            .headers_named(challenger.credentials_header())
            .filter_map(Credentials::parse)
            .find(|c| c.realm.eq_ignore_ascii_case(realm))
            .ok_or(AuthError::Missing)?;
        // A provisioned device authenticates as `<user>.<mac>` for its user's requests.
        let own = creds.username == user
            || (self.devices.is_some()
                && careflow_core::provisioning::device_of_auth_name(&creds.username, user)
                    .is_some());
        if !own {
            // A policy refusal, not a guess: no digest was checked.
            tracing::info!(src = %ctx.source, realm, method = msg.method_str(),
                "credentials of another user than the request's; refused");
            return Err(AuthError::WrongIdentity);
        }
        match self.auth.prepare(&creds, realm, now) {
            Ok(pending) => Ok(Prepared { creds, pending }),
            Err(f) => {
                self.refused(ctx, &creds.username, realm, f);
                Err(AuthError::Refused { stale: false })
            }
        }
    }

    /// Second step: the response against the subscriber's HA1 (a decoy for unknown or disabled
    /// users, so they look alike).
    pub(crate) async fn verify(
        &self,
        msg: &Message,
        ctx: &Ctx,
        realm: &str,
        prepared: &Prepared<'_>,
        now: u64,
    ) -> Result<(), AuthError> {
        let username = prepared.creds.username.as_ref();
        let store_failed = |e: careflow_store::StoreError, what: &str| {
            self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, retryable = e.retryable(), method = msg.method_str(),
                realm, "{what} lookup failed; answering 503");
            AuthError::Store
        };
        // `prepare` let through only the user's own name or one of its device names.
        let device = match (self.devices, username.rsplit_once('.')) {
            (Some(devices), Some((owner, mac)))
                if careflow_core::provisioning::device_of_auth_name(username, owner).is_some() =>
            {
                let d = devices
                    .device(mac)
                    .await
                    .map_err(|e| store_failed(e, "device"))?;
                Some((
                    owner,
                    d.filter(|d| d.username == owner && d.domain == realm),
                ))
            }
            _ => None,
        };
        let owner = device.as_ref().map_or(username, |(owner, _)| owner);
        let subscriber = self
            .subscribers
            .auth_row(owner, realm)
            .await
            .map_err(|e| store_failed(e, "subscriber"))?
            .filter(|s| s.enabled);
        let alg = prepared.pending.algorithm;
        // A user whose devices share the user's credentials keeps the password before their
        // last rotation during its grace; looked up only when the current one did not match.
        let shared_previous = match (&device, &subscriber, self.devices) {
            (None, Some(s), Some(devices))
                if !self.auth.digest_matches(
                    prepared.pending,
                    &prepared.creds,
                    msg.method_str(),
                    s.ha1(alg),
                ) =>
            {
                devices
                    .devices(Some((owner, realm)))
                    .await
                    .map_err(|e| store_failed(e, "device"))?
                    .into_iter()
                    .filter(|d| d.shared)
                    .filter_map(|d| d.previous.filter(|p| p.valid_until > now as i64))
                    .map(|p| match alg {
                        careflow_proto::digest::Algorithm::Md5 => p.ha1_md5,
                        careflow_proto::digest::Algorithm::Sha256 => p.ha1_sha256,
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let ha1s: Vec<&str> = match (&device, &subscriber) {
            (None, Some(s)) => std::iter::once(s.ha1(alg))
                .chain(shared_previous.iter().map(String::as_str))
                .collect(),
            (Some((_, Some(d))), Some(_)) if !d.shared => d.sip_ha1s(alg, now as i64),
            _ => Vec::new(),
        };
        match self.auth.finish_any(
            prepared.pending,
            &prepared.creds,
            msg.method_str(),
            &ha1s,
            now,
        ) {
            Ok(()) => Ok(()),
            Err((f, verdict)) => {
                self.refused(ctx, username, realm, f);
                Err(AuthError::Refused {
                    stale: matches!(verdict, Verdict::Challenge { stale: true }),
                })
            }
        }
    }

    /// The answer to `err`: a fresh challenge, 403 or 503.
    pub(crate) fn answer(
        &self,
        msg: &Message,
        ctx: &Ctx,
        challenger: Challenger,
        realm: &str,
        err: &AuthError,
        now: u64,
    ) -> (u16, Bytes) {
        match err {
            AuthError::Missing => self.challenge(msg, ctx, challenger, realm, now, false),
            AuthError::Refused { stale } => {
                self.challenge(msg, ctx, challenger, realm, now, *stale)
            }
            AuthError::WrongIdentity => (
                403,
                self.reply(msg, ctx, 403)
                    .reason(challenger.identity_reason())
                    .build(),
            ),
            AuthError::Store => (
                503,
                self.reply(msg, ctx, 503).header("Retry-After", 5).build(),
            ),
        }
    }

    /// 401 or 407 with one challenge per configured algorithm.
    pub(crate) fn challenge(
        &self,
        msg: &Message,
        ctx: &Ctx,
        challenger: Challenger,
        realm: &str,
        now: u64,
        stale: bool,
    ) -> (u16, Bytes) {
        let code = challenger.status();
        let mut b = self.reply(msg, ctx, code);
        for c in self.auth.challenges(realm, now, stale) {
            b = b.header(challenger.challenge_header(), c);
        }
        (code, b.build())
    }

    /// Credentials that were not accepted: a guess (wrong digest, unknown user) is a failed
    /// authentication; a stale, reused or foreign nonce, or a realm or algorithm we do not
    /// offer, is only answered with a fresh challenge. Browser SIP stacks that resend a cached
    /// nonce with the same nc on every refresh must never be banned for it.
    fn refused(&self, ctx: &Ctx, user: &str, realm: &str, f: Failure) {
        if f.is_guess() {
            self.failed(ctx, user, realm, failure_text(f));
        } else {
            self.metrics
                .auth_rechallenges
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(src = %ctx.source, realm, reason = failure_text(f),
                "credentials not usable; challenged again");
        }
    }

    /// One failed guess (never the first challenge of a normal registration): the stable
    /// security log line, the metric, and the brute-force count that may ban the flow.
    fn failed(&self, ctx: &Ctx, user: &str, realm: &str, reason: &str) {
        self.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        // The user name comes from the network: keep the line one line, and short.
        let user: String = user
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        tracing::warn!(
            target: "careflow::security",
            "SECURITY auth_failed src_ip={} src_port={} user={user} realm={realm} reason={}",
            ctx.source.ip(),
            ctx.source.port(),
            reason.replace(' ', "_")
        );
        if let Some(guard) = self.guard
            && let Some((scope, reason)) =
                guard.auth_failed(ctx.source, &user, std::time::Instant::now())
        {
            self.metrics.bans.fetch_add(1, Ordering::Relaxed);
            careflow_transport::log_ban(scope, reason, guard.config().ban_time);
        }
    }
}

impl Digest<'_> {
    /// A response of ours, with what every response of ours carries.
    fn reply<'m>(&self, msg: &'m Message, ctx: &Ctx, code: u16) -> ResponseBuilder<'m> {
        ResponseBuilder::new(msg, code)
            .source(ctx.source)
            .to_tag(to_tag(msg))
            .header("Server", self.server_header)
    }
}

fn failure_text(f: Failure) -> &'static str {
    match f {
        Failure::WrongRealm => "wrong realm",
        Failure::UnsupportedAlgorithm => "unsupported algorithm",
        Failure::BadNonce => "invalid nonce",
        Failure::StaleNonce => "stale nonce",
        // Logged alike on purpose: the log must not become an enumeration oracle either.
        Failure::UnknownUser | Failure::WrongPassword => "bad credentials",
        Failure::Replay => "replayed nonce count",
        Failure::BadQop => "bad qop",
    }
}
