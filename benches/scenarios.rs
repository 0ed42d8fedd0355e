//! vmhop's scenario benchmarks: `cargo bench --bench scenarios -- [FILTER]
//! [--runs N] [--memory 1G,4G,8G] [--json] [--list]`. Every figure is a
//! median over runs with its range, next to a baseline measured in the same
//! run; see docs/benchmarks.md for the scenarios and how to add one.
//!
//! This file only lists the scenarios and dispatches; the harness (`harness/`)
//! repeats, aggregates and prints, and each scenario module measures.

mod harness;

use harness::{Options, Scenario};

/// The scenarios that run at every `--memory` size (the others run at
/// 1 GiB only): the figures whose growth with guest memory matters.
const SCALED: &[&str] = &[
    "checkpoint-full",
    "checkpoint-incremental-1pct",
    "checkpoint-incremental-10pct",
    "restore-lazy",
    "restore-eager",
    "numa-stop-copy",
    "numa-live-10k",
];

/// Every scenario, in the order they run. Add new ones here.
fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(harness::guest::scenarios());
    all.extend(harness::checkpoint::scenarios());
    all.extend(harness::restore::scenarios());
    all.extend(harness::numa::scenarios());
    all.extend(harness::migration::scenarios());
    all.extend(harness::disk::scenarios());
    all.extend(harness::disk_chain::scenarios());
    all.extend(harness::net::scenarios());
    all.extend(harness::reset::scenarios());
    all.extend(harness::clones::scenarios());
    all.into_iter()
        .map(|s| {
            if SCALED.contains(&s.name) {
                s.scales_with_memory()
            } else {
                s
            }
        })
        .collect()
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(harness::migration::TCP_SINK_ARG) {
        // A child of the migration scenarios: the far end of the plain TCP
        // baseline.
        harness::migration::tcp_sink();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some(harness::streams::STREAM_SINK_ARG) {
        // A child of migrate-key: the far end of the TLS or Noise baseline.
        let args: Vec<String> = std::env::args().skip(2).collect();
        harness::streams::stream_sink(&args);
        return;
    }
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("scenarios: {e}");
            std::process::exit(2);
        }
    };
    let all = scenarios();
    if opts.list {
        for s in &all {
            let scales = if s.scales {
                " [every --memory size]"
            } else {
                ""
            };
            println!("{:20} {}{scales}", s.name, s.about);
        }
        return;
    }
    if opts.quick {
        // Started by `cargo test`: check the harness itself, then run each
        // scenario once, briefly, to prove it still works.
        harness::self_check();
    }
    let report = harness::run_all(all, &opts);
    if !report.failures.is_empty() {
        std::process::exit(1);
    }
}
