//! End-to-end tests: the real binary against real SIP peers (sipp, sipsak, baresip) and raw
#![allow(unreachable_pub, clippy::unwrap_used)]
//! SIP over UDP/TCP.

mod api;
mod audit;
mod blf;
mod blf_state;
mod calls;
mod cluster;
mod cluster_failover;
mod cluster_link;
mod dashboard;
mod database;
mod events;
mod media;
mod migration;
mod nat;
mod nat_site;
mod operations;
mod outbound;
mod package;
mod peers;
mod presence;
mod protocol;
mod provision;
mod push;
mod records;
mod register;
mod secure;
mod security;
mod subscriber_cache;
mod support;
mod websocket;
