//! Starts the real `careflow-sip` binary (`careflow_test_support::Server`) and speaks raw SIP
//! to it (`careflow_test_support::ua`). Tools the tests need must be installed (scripts/test
//! does it); a missing tool fails the test loudly instead of skipping it.

use std::path::Path;

pub const BIN: &str = env!("CARGO_BIN_EXE_careflow-sip");

pub use careflow_test_support::ua::*;
pub use careflow_test_support::{Rtpengine, Server, TestDb, free_port, http_get_at, require};

/// `Server::start(domain)` and `Server::start_with(domain, env)` for this crate's binary.
pub trait Start {
    fn start(domain: &str) -> Server;
    fn start_with(domain: &str, env: &[(&str, &str)]) -> Server;
}

impl Start for Server {
    fn start(domain: &str) -> Server {
        Server::launch(Path::new(BIN), domain, &[])
    }

    fn start_with(domain: &str, env: &[(&str, &str)]) -> Server {
        Server::launch(Path::new(BIN), domain, env)
    }
}

pub fn interop_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop"))
}
