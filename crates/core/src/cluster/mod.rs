//! Several nodes as one service (sans-IO parts).
//!
//! - [`token`]: the owner token: which node holds a device's flow (node id, boot epoch, the
//!   flow), signed with the cluster secret, two keys accepted at a time for rotation. It is
//!   the user part of the Path-style entry a binding stores, so any node that looks the device
//!   up knows where to send the request and the owner can check it.
//! - [`membership`]: liveness as data: which nodes are alive, from reads of their expiring
//!   keys (and announcements), with the hysteresis that keeps a store stall from marking
//!   healthy nodes dead; which node does the once-per-cluster chores.

pub mod membership;
pub mod token;

pub use membership::{Announcement, Liveness, Membership};
pub use token::{ClusterKeys, NodeId, OwnerToken};
