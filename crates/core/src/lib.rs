//! Sans-IO logic of careflow-sip.
//!
//! Everything here takes the current time as an argument and returns decisions; nothing reads
//! a clock, touches a socket or a database. The `careflow-server` crate drives it.
//!
//! - [`nonce`]: stateless HMAC nonces and nonce-count replay tracking.
//! - [`auth`]: digest challenges and verification (RFC 3261 §22, RFC 7616/8760).
//! - [`registrar`]: which bindings a REGISTER adds, refreshes or removes (RFC 3261 §10.3).
//! - [`transaction`]: non-INVITE server transactions (RFC 3261 §17.2.2).
//! - [`proxy`]: proxy decisions of RFC 3261 §16 (Max-Forwards, loops, branches, Route).
//! - [`cluster`]: owner tokens and membership of several nodes acting as one.
//! - [`keepalive`]: which NATed bindings get an OPTIONS this round, and which are gone.
//! - [`push`]: RFC 8599 push parameters, `Feature-Caps`, and requests waiting for a sleeping
//!   device (one push per call and device).
//! - [`audit`]: the audit trail's hash chain and its verification.
//! - [`cdr`]: call detail records, one per call, from the proxy's view of it.
//! - [`binding`]: the location-service record shared by the registrar and the stores.
//! - [`cache`]: a bounded time-to-live cache for the rows every authenticated request reads.
//! - [`scanner`]: which User-Agents name a SIP scanner.
#![warn(missing_docs)]

pub mod audit;
pub mod auth;
pub mod binding;
pub mod cache;
pub mod cdr;
pub mod cidr;
pub mod cluster;
pub mod dialog_event;
pub mod flow;
pub mod guard;
pub mod keepalive;
pub mod media;
pub mod nonce;
pub mod provisioning;
pub mod proxy;
pub mod push;
pub mod ratelimit;
pub mod registrar;
pub mod scanner;
pub mod transaction;

pub use binding::{Binding, Transport};
