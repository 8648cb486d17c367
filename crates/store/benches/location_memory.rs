//! Benchmark (not a test; issue 22): memory of the embedded location service per registered
//! contact, at 10,000, 100,000 and 1,000,000 contacts, and after a refresh of every one of them
//! (a second round must not grow it). Bindings shaped as a hospital's: desk phones with
//! one of a few User-Agents, half with an outbound instance, sources behind NAT.
//!
//! `cargo bench -p careflow-store --bench location_memory [-- --max 1000000]`. The RSS is
//! the whole process's (read from /proc/self/statm), so only the growth per contact is printed;
//! the journal is off (it holds one batch of records at a time).
#![allow(unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;

use careflow_core::registrar::Outcome;
use careflow_core::{Binding, Transport};
use careflow_store::LocationStore;
use careflow_store::location::EmbeddedLocation;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const USER_AGENTS: &[&str] = &[
    "Yealink SIP-T46S 66.86.0.15",
    "Yealink SIP-T54W 96.86.0.100",
    "Cisco/SPA504G-7.6.2",
    "Grandstream GXP2170 1.0.11.16",
    "MicroSIP/3.21.3",
];

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split(' ').nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn binding(i: u64, round: u64, now: u64) -> Binding {
    let user = 100_000 + i;
    let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
    Binding {
        id: i + 1,
        aor: format!("{user}@hospital.example"),
        contact: format!("sip:{user}@{ip}:5060;transport=udp"),
        call_id: format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        cseq: 1 + round as u32,
        expires_at: now + 3600,
        registered_at: now,
        q: None,
        instance: i
            .is_multiple_of(2)
            .then(|| format!("\"<urn:uuid:00000000-0000-1000-8000-{:012x}>\"", i)),
        reg_id: i.is_multiple_of(2).then_some(1),
        transport: Transport::Udp,
        source: SocketAddr::new(
            format!("192.0.{}.{}", (i >> 8) & 255, i & 255)
                .parse()
                .unwrap(),
            5060 + (i % 1000) as u16,
        ),
        user_agent: Some(USER_AGENTS[(i % USER_AGENTS.len() as u64) as usize].to_string()),
        conn: None,
        path: Vec::new(),
        here: true,
        owner: None,
    }
}

async fn fill(store: &EmbeddedLocation, from: u64, to: u64, round: u64, now: u64) {
    for i in from..to {
        let b = binding(i, round, now);
        let aor = b.aor.clone();
        let decide = move |_: &[Binding]| {
            Ok(Outcome {
                bindings: vec![b.clone()],
                changed: true,
            })
        };
        store.update(&aor, &decide).await.unwrap().unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let max: u64 = args
        .iter()
        .position(|a| a == "--max")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let now = 1_800_000_000;
    println!("embedded location service, in memory; RSS growth per contact");
    for n in [10_000u64, 100_000, 1_000_000] {
        if n > max {
            break;
        }
        let store = EmbeddedLocation::in_memory();
        let before = rss_bytes();
        rt.block_on(fill(&store, 0, n, 0, now));
        let first = rss_bytes();
        rt.block_on(fill(&store, 0, n, 1, now + 60));
        let second = rss_bytes();
        assert_eq!(store.count(), n as usize);
        println!(
            "{n:>9} contacts: {:>5} bytes each after the first round, {:>5} after a refresh of all",
            (first.saturating_sub(before)) / n,
            (second.saturating_sub(before)) / n,
        );
        drop(store);
    }
}
