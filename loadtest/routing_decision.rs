//! The routing decision measured alone: src/routing.rs compiled as it is (its tests
//! left out), timed per `RouteTable::find` on tables of several sizes. Run from the repo:
//!   rustc --edition 2021 -C opt-level=3 -C target-cpu=native loadtest/routing_decision.rs -o /tmp/routing-decision && taskset -c 1 /tmp/routing-decision
//! Results: loadtest/results/2026-11-30-routing-decision.md.
#![allow(dead_code)]
#[path = "../src/routing.rs"]
mod routing;
use std::hint::black_box;
use std::time::Instant;

fn measure(name: &str, table: &routing::RouteTable, host: Option<&str>, path: &str) {
    const N: u32 = 20_000_000;
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for _ in 0..N {
            black_box(table.find(black_box(host), black_box(path)));
        }
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(N));
    }
    println!("{name:<58} {best:>6.2} ns/decision (best of 7 x {N})");
}

fn main() {
    let empty = routing::RouteTable::new(std::iter::empty());
    let channels = routing::RouteTable::new([(None, "/ws/")]);
    let typical = routing::RouteTable::new([
        (None, "/ws/"),
        (None, "/upload/"),
        (Some("api.example.com"), "/"),
        (Some("*.example.org"), "/"),
    ]);
    let many: Vec<String> = (0..32).map(|i| format!("/app{i}/")).collect();
    let many = routing::RouteTable::new(many.iter().map(|p| (None, p.as_str())));
    let (host, path) = (Some("www.example.com:443"), "/accounts/profile/");
    measure("no [[route]] (default route)", &empty, host, path);
    measure("1 route (/ws/), request to the default", &channels, host, path);
    measure("4 routes (2 by host), request to the default", &typical, host, path);
    measure("4 routes (2 by host), /ws/ request", &typical, host, "/ws/chat/");
    measure("32 prefix routes, request to the default", &many, host, path);
}
