//! End-to-end tests: the real binary against real SIP peers (sipp, sipsak, baresip) and raw
#![allow(unreachable_pub)]
//! SIP over UDP/TCP.

mod protocol;
mod register;
mod support;
