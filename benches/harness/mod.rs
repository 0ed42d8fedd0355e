//! The scenario-benchmark harness: a [`Scenario`] is a name and a closure
//! that measures once and returns one [`Sample`] per metric, each with the
//! in-run baseline it is compared to. The harness repeats every scenario
//! `--runs` times, then reports per metric the median, the range over runs,
//! the baseline's median and the median of the per-run ratios, as a table or
//! as one JSON object (`--json`).
//!
//! Scenarios marked [`Scenario::scales_with_memory`] run once per guest
//! memory size given with `--memory` (default 1 GiB only); every result
//! carries the size it was measured at (`memory_gib`).
//!
//! This module owns the repetition, the statistics and the output. It knows
//! nothing about VMs: the scenarios (`guest.rs`, ...) measure, the harness
//! only aggregates. It never judges a figure: no budget here fails a run.

pub mod checkpoint;
pub mod clones;
pub mod disk;
pub mod disk_chain;
pub mod fixture;
pub mod guest;
pub mod migration;
pub mod net;
pub mod numa;
pub mod reset;
pub mod restore;
pub mod streams;

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Runs per scenario when `--runs` is not given.
pub const DEFAULT_RUNS: usize = 5;
/// Guest memory, GiB, of every scenario when `--memory` is not given, and
/// of the scenarios that do not scale with memory whatever it says.
pub const DEFAULT_MEMORY_GIB: u64 = 1;
/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

/// A scenario's measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A library call failed; `what` names the step.
    #[error("{what}: {source}")]
    Vm {
        /// The step (e.g. "creating a 1 GiB VM with 2 vCPUs").
        what: String,
        /// The library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The guest or the host did not behave as the scenario needs.
    #[error("{0}")]
    Failed(String),
}

/// Wraps a VM error with the step that produced it.
pub fn vm_step<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> BenchError {
    let what = what.into();
    move |source| BenchError::Vm {
        what,
        source: Box::new(source),
    }
}

/// One figure a run produced: the value and, measured in the same run on
/// the same bytes, the baseline it is compared to.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What was measured (e.g. "1 vCPU, dirty log on").
    pub metric: String,
    /// Its unit (e.g. "pages/s", "µs").
    pub unit: &'static str,
    /// The value of this run.
    pub value: f64,
    /// The baseline of this run, if the metric has one.
    pub baseline: Option<f64>,
    /// Show every run's value (and baseline) under the table, not only the
    /// median and range: for a figure judged run by run (a guest's longest
    /// stall, "within 1 ms in k of N runs").
    pub per_run: bool,
}

impl Sample {
    /// A sample without a baseline (say so in the scenario's description).
    pub fn new(metric: impl Into<String>, unit: &'static str, value: f64) -> Sample {
        Sample {
            metric: metric.into(),
            unit,
            value,
            baseline: None,
            per_run: false,
        }
    }

    /// The same sample compared to `baseline`.
    pub fn vs(mut self, baseline: f64) -> Sample {
        self.baseline = Some(baseline);
        self
    }

    /// The same sample, listed run by run under the table.
    pub fn per_run(mut self) -> Sample {
        self.per_run = true;
        self
    }
}

/// What a scenario's closure may ask about the run it is in.
#[derive(Debug, Clone, Copy)]
pub struct RunCtx {
    /// 0-based run index.
    pub run: usize,
    /// Smoke mode (`cargo test` runs benches without `--bench`): shrink
    /// windows and iteration counts so that only "does it work" is checked.
    pub quick: bool,
    /// Guest memory this run is for, bytes (the nominal size: smoke mode
    /// shrinks it, see `fixture::vm_bytes`).
    pub memory: u64,
}

impl RunCtx {
    /// A measuring window, a tenth of it in smoke mode.
    pub fn window(&self, d: Duration) -> Duration {
        if self.quick {
            d / 10
        } else {
            d
        }
    }

    /// An iteration count, a tenth of it (at least 5) in smoke mode.
    pub fn iterations(&self, n: usize) -> usize {
        if self.quick {
            (n / 10).max(5)
        } else {
            n
        }
    }
}

/// The measuring closure of a scenario: one call, one run.
pub type RunFn = Box<dyn FnMut(&RunCtx) -> Result<Vec<Sample>, BenchError>>;

/// A named measurement, repeated `--runs` times.
pub struct Scenario {
    /// Name, matched by the command line filter.
    pub name: &'static str,
    /// One line: what is measured and what the baseline is.
    pub about: &'static str,
    /// Runs at every `--memory` size (else only at [`DEFAULT_MEMORY_GIB`]).
    pub scales: bool,
    run: RunFn,
}

impl Scenario {
    /// A scenario whose closure measures once per call.
    pub fn new(
        name: &'static str,
        about: &'static str,
        run: impl FnMut(&RunCtx) -> Result<Vec<Sample>, BenchError> + 'static,
    ) -> Scenario {
        Scenario {
            name,
            about,
            scales: false,
            run: Box::new(run),
        }
    }

    /// The same scenario, run once per `--memory` size: its closure sizes
    /// its VMs, working sets and baselines from [`RunCtx::memory`].
    pub fn scales_with_memory(mut self) -> Scenario {
        self.scales = true;
        self
    }
}

/// The aggregate of one metric over all runs.
#[derive(Debug, Clone, Serialize)]
pub struct MetricResult {
    /// Scenario name.
    pub scenario: String,
    /// Metric name.
    pub metric: String,
    /// Guest memory the scenario ran with, GiB.
    pub memory_gib: u64,
    /// Unit of values and baselines.
    pub unit: String,
    /// Median of the per-run values.
    pub median: f64,
    /// Smallest per-run value.
    pub min: f64,
    /// Largest per-run value.
    pub max: f64,
    /// Median of the per-run baselines (None: no baseline).
    pub baseline_median: Option<f64>,
    /// Median of the per-run ratios value / baseline. Pairing value and
    /// baseline within a run cancels the drift of a shared machine, so
    /// this may differ slightly from median / baseline_median.
    pub ratio: Option<f64>,
    /// Every run's value, in run order.
    pub values: Vec<f64>,
    /// Every run's baseline, in run order.
    pub baselines: Vec<f64>,
    /// Sum of the per-run values: for a yes/no metric (unit [`YES_1`]),
    /// the number of runs in which it held.
    pub sum: f64,
    /// Whether the table lists every run's value (see [`Sample::per_run`]).
    pub per_run: bool,
}

/// The unit of a yes/no metric: 1 in a run where it held, 0 where not.
/// The table shows such a metric as "held in k/N runs".
pub const YES_1: &str = "yes=1";

/// A scenario that failed, with the run that failed.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// Scenario name.
    pub scenario: String,
    /// Guest memory the scenario ran with, GiB.
    pub memory_gib: u64,
    /// 0-based run index.
    pub run: usize,
    /// The error.
    pub error: String,
}

/// Everything one invocation measured (what `--json` prints).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Runs per scenario.
    pub runs: usize,
    /// Whether this was a smoke run (numbers then mean nothing).
    pub quick: bool,
    /// The `--memory` sizes, GiB, in the order they ran.
    pub memory_gib: Vec<u64>,
    /// What the host is.
    pub host: HostInfo,
    /// The scenarios that ran, with what each measures.
    pub scenarios: Vec<ScenarioInfo>,
    /// One entry per (scenario, metric), in the order measured.
    pub results: Vec<MetricResult>,
    /// Scenarios that failed.
    pub failures: Vec<Failure>,
    /// Wall-clock time of the whole invocation, seconds.
    pub elapsed_s: f64,
    /// 1-minute load average when the benchmarks ended (see
    /// [`HostInfo::load_start`]).
    pub load_end: f64,
    /// The host's stalls when the benchmarks ended (see
    /// [`HostInfo::stalls_start`]).
    pub stalls_end: Stalls,
}

/// A scenario's name and description, for the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioInfo {
    /// Name.
    pub name: String,
    /// What is measured and what the baseline is.
    pub about: String,
    /// The guest memory sizes, GiB, it ran at.
    pub memory_gib: Vec<u64>,
}

/// The facts about the host that change how figures read.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    /// Online CPUs.
    pub cpus: usize,
    /// Whether the host's KVM is PVM (shadow paging; see ENVIRONMENT.md).
    pub kvm_pvm: bool,
    /// Kernel release.
    pub kernel: String,
    /// 1-minute load average when the benchmarks started: these machines
    /// are shared, and a busy one shows in every figure (most in the
    /// scheduler-bound ones, such as pause/resume of 2 vCPUs on 2 CPUs).
    pub load_start: f64,
    /// How often the host took the CPUs away when the benchmarks started
    /// (see [`Stalls`]).
    pub stalls_start: Stalls,
}

/// How often the host took a CPU away from a thread that never sleeps:
/// one spinning thread per CPU for [`STALL_PROBE`], each noting every gap
/// between two consecutive clock reads.
///
/// The load average misses this: on these machines the hypervisor under
/// the host steals time (`st` in `top`), and a thread of an otherwise idle
/// host loses the CPU for 1–20 ms dozens of times a second on a bad day.
/// A figure in microseconds (a pause) cannot be judged on such a host; a
/// quiet host shows almost no gaps over 1 ms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stalls {
    /// Gaps longer than 1 ms, per second per CPU.
    pub over_1ms_per_s: f64,
    /// Gaps longer than 100 µs, per second per CPU.
    pub over_100us_per_s: f64,
    /// The longest gap, µs.
    pub longest_us: f64,
}

/// How long [`Stalls::probe`] spins (a tenth of it in smoke mode).
pub const STALL_PROBE: Duration = Duration::from_secs(1);

impl Stalls {
    /// Spins one thread per CPU for `window` and counts the gaps.
    pub fn probe(window: Duration) -> Stalls {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let gaps: Vec<(u64, u64, Duration)> = std::thread::scope(|s| {
            let spinners: Vec<_> = (0..cpus)
                .map(|_| {
                    s.spawn(move || {
                        let (mut over_1ms, mut over_100us, mut longest) = (0, 0, Duration::ZERO);
                        let start = Instant::now();
                        let mut prev = start;
                        while prev.duration_since(start) < window {
                            let now = Instant::now();
                            let gap = now.duration_since(prev);
                            over_100us += u64::from(gap > Duration::from_micros(100));
                            over_1ms += u64::from(gap > Duration::from_millis(1));
                            longest = longest.max(gap);
                            prev = now;
                        }
                        (over_1ms, over_100us, longest)
                    })
                })
                .collect();
            spinners
                .into_iter()
                .map(|h| h.join().unwrap_or((0, 0, Duration::ZERO)))
                .collect()
        });
        let per_s = |n: u64| n as f64 / window.as_secs_f64() / cpus as f64;
        Stalls {
            over_1ms_per_s: per_s(gaps.iter().map(|g| g.0).sum()),
            over_100us_per_s: per_s(gaps.iter().map(|g| g.1).sum()),
            longest_us: gaps
                .iter()
                .map(|g| g.2.as_secs_f64() * 1e6)
                .fold(0.0, f64::max),
        }
    }
}

impl std::fmt::Display for Stalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}/s over 1 ms, {:.1}/s over 100 µs, longest {} µs",
            self.over_1ms_per_s,
            self.over_100us_per_s,
            fmt_num(self.longest_us)
        )
    }
}

impl HostInfo {
    fn read(stall_probe: Duration) -> HostInfo {
        HostInfo {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kvm_pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            load_start: load_average(),
            stalls_start: Stalls::probe(stall_probe),
        }
    }
}

/// The 1-minute load average (NaN if /proc/loadavg is unreadable).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Available memory (MemAvailable of /proc/meminfo), bytes; None if
/// unreadable.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses `--memory`'s list: sizes in whole GiB, `4`, `4G` or `4GiB`,
/// separated by commas; at least one, none twice.
fn parse_memory(list: &str) -> Result<Vec<u64>, String> {
    let mut sizes = Vec::new();
    for item in list.split(',') {
        let t = item.trim();
        let digits = t
            .strip_suffix("GiB")
            .or_else(|| t.strip_suffix('G'))
            .or_else(|| t.strip_suffix('g'))
            .unwrap_or(t);
        let gib: u64 = digits
            .parse()
            .map_err(|_| format!("--memory {list}: {t:?} is not a size in whole GiB (e.g. 4G)"))?;
        if gib == 0 || gib > 64 {
            return Err(format!("--memory {list}: {gib} GiB is out of 1..=64"));
        }
        if sizes.contains(&gib) {
            return Err(format!("--memory {list}: {gib} GiB given twice"));
        }
        sizes.push(gib);
    }
    Ok(sizes)
}

/// What the command line takes, for error messages.
const ARGS: &str = "FILTER, --runs N, --memory LIST, --json, --list";

/// The command line: `[FILTER...] [--runs N] [--memory LIST] [--json] [--list]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Substrings; a scenario runs if its name contains any (none: all).
    pub filters: Vec<String>,
    /// Runs per scenario.
    pub runs: usize,
    /// Guest memory sizes, GiB, for the scenarios that scale with memory.
    pub memory: Vec<u64>,
    /// Print the report as one JSON object on stdout.
    pub json: bool,
    /// Only list the scenarios.
    pub list: bool,
    /// Smoke mode: no `--bench` flag, i.e. started by `cargo test`.
    pub quick: bool,
}

impl Options {
    /// Parses the arguments after the program name. `cargo bench` passes
    /// `--bench`; `cargo test` does not, which selects smoke mode (one
    /// short run) unless `--runs` asks otherwise.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut o = Options {
            filters: Vec::new(),
            runs: DEFAULT_RUNS,
            memory: vec![DEFAULT_MEMORY_GIB],
            json: false,
            list: false,
            quick: true,
        };
        let mut runs_given = false;
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--bench" => o.quick = false,
                "--json" => o.json = true,
                "--list" => o.list = true,
                "--runs" => {
                    let v = args.next().ok_or("--runs needs a number")?;
                    o.runs = v.parse().map_err(|_| format!("--runs {v}: not a number"))?;
                    runs_given = true;
                }
                "--memory" => {
                    let v = args
                        .next()
                        .ok_or("--memory needs a list of sizes, e.g. 1G,4G")?;
                    o.memory = parse_memory(&v)?;
                }
                s if s.starts_with("--memory=") => {
                    o.memory = parse_memory(&s["--memory=".len()..])?
                }
                // What libtest would accept from `cargo test`: ignore.
                "--nocapture" | "--quiet" | "-q" | "--test" | "--show-output" => {}
                s if s.starts_with("--runs=") => {
                    let v = &s["--runs=".len()..];
                    o.runs = v.parse().map_err(|_| format!("--runs {v}: not a number"))?;
                    runs_given = true;
                }
                s if s.starts_with('-') => {
                    return Err(format!("unknown option {s} (expected {ARGS})"));
                }
                s => o.filters.push(s.to_string()),
            }
        }
        if o.runs == 0 {
            return Err("--runs must be at least 1".into());
        }
        if o.quick && !runs_given {
            o.runs = 1;
        }
        Ok(o)
    }

    fn selects(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }
}

/// Median of `v` (mean of the middle two for an even count); NaN if empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// The `q` quantile (0..=1) of `v` by nearest rank; NaN if empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q.clamp(0.0, 1.0) * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// Smallest and largest of `v` ((NaN, NaN) if empty).
pub fn min_max(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Per-run samples of one metric, collected in run order.
struct Series {
    scenario: String,
    metric: String,
    memory_gib: u64,
    unit: &'static str,
    values: Vec<f64>,
    baselines: Vec<f64>,
    ratios: Vec<f64>,
    per_run: bool,
}

impl Series {
    fn result(&self) -> MetricResult {
        let (min, max) = min_max(&self.values);
        MetricResult {
            scenario: self.scenario.clone(),
            metric: self.metric.clone(),
            memory_gib: self.memory_gib,
            unit: self.unit.to_string(),
            median: median(&self.values),
            min,
            max,
            baseline_median: (!self.baselines.is_empty()).then(|| median(&self.baselines)),
            ratio: (!self.ratios.is_empty()).then(|| median(&self.ratios)),
            values: self.values.clone(),
            baselines: self.baselines.clone(),
            sum: self.values.iter().sum(),
            per_run: self.per_run,
        }
    }
}

/// Runs the selected scenarios and prints the report; returns the report.
///
/// One pass per `--memory` size, in the order given: the first runs every
/// selected scenario (those that do not scale with memory at
/// [`DEFAULT_MEMORY_GIB`]), the others only the scaling ones. A scenario is
/// dropped (freeing what it kept between runs, such as the restore
/// scenarios' checkpoint) after its last pass.
pub fn run_all(scenarios: Vec<Scenario>, opts: &Options) -> Report {
    let started = Instant::now();
    let stall_probe = if opts.quick {
        STALL_PROBE / 10
    } else {
        STALL_PROBE
    };
    let host = HostInfo::read(stall_probe);
    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut ran: Vec<ScenarioInfo> = Vec::new();
    let mut selected: Vec<Option<Scenario>> = scenarios
        .into_iter()
        .filter(|s| opts.selects(s.name))
        .map(Some)
        .collect();
    let passes = opts.memory.len();
    for (pass, &size_gib) in opts.memory.iter().enumerate() {
        for slot in selected.iter_mut() {
            let Some(s) = slot.as_mut() else { continue };
            let gib = if s.scales {
                size_gib
            } else {
                DEFAULT_MEMORY_GIB
            };
            match ran.iter_mut().find(|i| i.name == s.name) {
                Some(i) => i.memory_gib.push(gib),
                None => ran.push(ScenarioInfo {
                    name: s.name.to_string(),
                    about: s.about.to_string(),
                    memory_gib: vec![gib],
                }),
            }
            let (series, failure) = run_scenario(s, opts, gib);
            results.extend(series.iter().map(Series::result));
            failures.extend(failure);
            if !s.scales || pass + 1 == passes {
                *slot = None;
            }
        }
    }
    drop(selected);
    let report = Report {
        runs: opts.runs,
        quick: opts.quick,
        memory_gib: opts.memory.clone(),
        host,
        scenarios: ran,
        results,
        failures,
        elapsed_s: started.elapsed().as_secs_f64(),
        load_end: load_average(),
        stalls_end: Stalls::probe(stall_probe),
    };
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report is plain data")
        );
    } else {
        print!("{}", render_table(&report));
    }
    report
}

/// Runs scenario `s` `--runs` times with `gib` GiB of guest memory;
/// returns its metrics and, if a run failed, the failure (the runs before
/// it are kept).
fn run_scenario(s: &mut Scenario, opts: &Options, gib: u64) -> (Vec<Series>, Option<Failure>) {
    let mut series: Vec<Series> = Vec::new();
    let memory = gib * GIB;
    let name = s.name;
    if opts.memory != [DEFAULT_MEMORY_GIB] {
        eprint!("{name} ({gib} GiB): run");
    } else {
        eprint!("{name}: run");
    }
    let fail = |run: usize, error: String| {
        eprintln!(" FAILED: {error}");
        Failure {
            scenario: name.to_string(),
            memory_gib: gib,
            run,
            error,
        }
    };
    // A scaled run may hold two copies of guest memory at once (numa
    // stop-copy's memcpy baseline and its move; a checkpoint's guest and
    // its page cache are reclaimable): refuse it up front rather than
    // have the OOM killer pick a process on a shared machine.
    if s.scales && !opts.quick {
        let need = 2 * memory + GIB;
        if let Some(avail) = mem_available().filter(|&a| a < need) {
            let f = fail(
                0,
                format!(
                    "not run: {gib} GiB of guest memory needs {} GiB available, the host has {:.1} GiB (MemAvailable)",
                    need / GIB,
                    avail as f64 / GIB as f64
                ),
            );
            return (series, Some(f));
        }
    }
    for run in 0..opts.runs {
        eprint!(" {}", run + 1);
        let _ = std::io::stderr().flush();
        match (s.run)(&RunCtx {
            run,
            quick: opts.quick,
            memory,
        }) {
            Ok(samples) => {
                for x in samples {
                    let i = match series.iter().position(|t| t.metric == x.metric) {
                        Some(i) => i,
                        None => {
                            series.push(Series {
                                scenario: name.to_string(),
                                metric: x.metric.clone(),
                                memory_gib: gib,
                                unit: x.unit,
                                values: Vec::new(),
                                baselines: Vec::new(),
                                ratios: Vec::new(),
                                per_run: x.per_run,
                            });
                            series.len() - 1
                        }
                    };
                    let t = &mut series[i];
                    t.values.push(x.value);
                    if let Some(b) = x.baseline {
                        t.baselines.push(b);
                        t.ratios.push(x.value / b);
                    }
                }
            }
            // A scenario that fails once (no KVM, no memory) will fail
            // again; keep the runs that worked.
            Err(e) => return (series, Some(fail(run, e.to_string()))),
        }
    }
    eprintln!();
    (series, None)
}

/// A number in 4 significant figures with a k/M/G suffix where it helps.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let ax = x.abs();
    let digits = if ax >= 1000.0 {
        0
    } else if ax >= 100.0 {
        1
    } else if ax >= 10.0 {
        2
    } else {
        3
    };
    format!("{x:.digits$}{suffix}")
}

/// The report as an aligned text table.
pub fn render_table(r: &Report) -> String {
    let header = [
        "scenario",
        "metric",
        "median",
        "[min..max]",
        "baseline",
        "ratio",
        "unit",
    ];
    let mut rows: Vec<[String; 7]> = vec![header.map(String::from)];
    // The default run's table stays as it was; with --memory, each
    // scenario name carries the size it ran at.
    let sized = r.memory_gib != [DEFAULT_MEMORY_GIB];
    let scenario = |name: &str, gib: u64| {
        if sized {
            format!("{name} @{gib}G")
        } else {
            name.to_string()
        }
    };
    for m in &r.results {
        rows.push([
            scenario(&m.scenario, m.memory_gib),
            m.metric.clone(),
            if m.unit == YES_1 {
                format!("{}/{} runs", m.sum, m.values.len())
            } else {
                fmt_num(m.median)
            },
            format!("[{}..{}]", fmt_num(m.min), fmt_num(m.max)),
            m.baseline_median.map(fmt_num).unwrap_or_else(|| "-".into()),
            m.ratio
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "-".into()),
            m.unit.clone(),
        ]);
    }
    let mut width = [0usize; 7];
    for row in &rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} run(s) per scenario{}; host: {} CPUs, kernel {}{}, load average {:.2}\n\
         host stalls (a spinning thread per CPU losing its CPU): {}\n\
         median and [min..max] over runs; baseline: its median; ratio: median of the per-run value/baseline",
        r.runs,
        if r.quick { " (smoke mode: figures mean nothing)" } else { "" },
        r.host.cpus,
        r.host.kernel,
        if r.host.kvm_pvm { ", KVM is PVM (shadow paging)" } else { "" },
        r.host.load_start,
        r.host.stalls_start,
    );
    if sized {
        let sizes: Vec<String> = r.memory_gib.iter().map(|g| g.to_string()).collect();
        let _ = writeln!(
            out,
            "guest memory: {} GiB for the scenarios that scale with it (NAME @SIZE), {DEFAULT_MEMORY_GIB} GiB for the others",
            sizes.join(", ")
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (j, (c, w)) in row.iter().zip(width).enumerate() {
            let pad = w - c.chars().count();
            // Text columns left-aligned, figures right-aligned.
            if j < 2 || j == 6 {
                let _ = write!(line, "{c}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{c}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if i == 0 {
            let _ = writeln!(
                out,
                "{}",
                "-".repeat(width.iter().sum::<usize>() + 2 * (width.len() - 1))
            );
        }
    }
    out.push_str(&render_per_run(r, &scenario));
    for f in &r.failures {
        let _ = writeln!(
            out,
            "FAILED {} (run {}): {}",
            scenario(&f.scenario, f.memory_gib),
            f.run + 1,
            f.error
        );
    }
    let _ = writeln!(
        out,
        "total {:.1} s, load average {:.2} at end, host stalls {}",
        r.elapsed_s, r.load_end, r.stalls_end
    );
    out
}

/// The metrics marked [`Sample::per_run`], run by run: one block per
/// scenario (and size), one line per run, one column per metric (its
/// baseline beside it in brackets), then each yes/no metric's count.
fn render_per_run(r: &Report, scenario: &dyn Fn(&str, u64) -> String) -> String {
    let mut out = String::new();
    let mut blocks: Vec<(String, Vec<&MetricResult>)> = Vec::new();
    for m in r.results.iter().filter(|m| m.per_run) {
        let name = scenario(&m.scenario, m.memory_gib);
        match blocks.iter_mut().find(|b| b.0 == name) {
            Some(b) => b.1.push(m),
            None => blocks.push((name, vec![m])),
        }
    }
    for (name, metrics) in blocks {
        let head: Vec<String> = metrics
            .iter()
            .map(|m| match m.baseline_median {
                Some(_) => format!("{} [baseline] {}", m.metric, m.unit),
                None => format!("{} {}", m.metric, m.unit),
            })
            .collect();
        let _ = writeln!(out, "\n{name}, run by run: {}", head.join(" | "));
        let runs = metrics.iter().map(|m| m.values.len()).max().unwrap_or(0);
        for i in 0..runs {
            let cells: Vec<String> = metrics
                .iter()
                .map(|m| {
                    let v = m.values.get(i).copied().unwrap_or(f64::NAN);
                    let v = if m.unit == YES_1 {
                        if v >= 1.0 {
                            "yes".into()
                        } else {
                            "no".into()
                        }
                    } else {
                        fmt_num(v)
                    };
                    match m.baselines.get(i) {
                        Some(b) => format!("{v} [{}]", fmt_num(*b)),
                        None => v,
                    }
                })
                .collect();
            let _ = writeln!(out, "  run {:>2}: {}", i + 1, cells.join(" | "));
        }
        for m in metrics.iter().filter(|m| m.unit == YES_1) {
            let n = m.values.len();
            let _ = writeln!(
                out,
                "  {}: {}/{n} runs ({:.0} %)",
                m.metric,
                m.sum,
                100.0 * m.sum / n.max(1) as f64
            );
        }
    }
    out
}

/// Polls `f` every millisecond until it returns true or `limit` passes;
/// returns whether it did. Used to wait for a guest to reach a state.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The harness's own checks. A `harness = false` bench is not compiled
/// with `--test`, so `#[test]`s here would never run; instead `main` calls
/// this in smoke mode (`cargo test --benches`), where a panic fails the run.
pub fn self_check() {
    use checks::*;
    median_of_odd_and_even_counts();
    quantile_by_nearest_rank();
    cargo_bench_flag_leaves_smoke_mode();
    ratio_is_median_of_per_run_ratios();
    memory_option_parses_sizes();
}

mod checks {
    use super::*;

    pub(super) fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    pub(super) fn quantile_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.95), 95.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
    }

    pub(super) fn cargo_bench_flag_leaves_smoke_mode() {
        let o = Options::parse(["--bench".to_string(), "pause".into()]).unwrap();
        assert!(!o.quick);
        assert_eq!(o.runs, DEFAULT_RUNS);
        assert_eq!(o.filters, vec!["pause".to_string()]);
        let o = Options::parse(Vec::<String>::new()).unwrap();
        assert!(o.quick);
        assert_eq!(o.runs, 1);
        let o = Options::parse(["--bench", "--runs", "9", "--json"].map(String::from)).unwrap();
        assert_eq!((o.runs, o.json), (9, true));
        assert!(Options::parse(["--runs", "0"].map(String::from)).is_err());
    }

    pub(super) fn memory_option_parses_sizes() {
        let o = Options::parse(["--bench"].map(String::from)).unwrap();
        assert_eq!(o.memory, vec![DEFAULT_MEMORY_GIB]);
        let o = Options::parse(["--memory", "1G,4GiB,8"].map(String::from)).unwrap();
        assert_eq!(o.memory, vec![1, 4, 8]);
        let o = Options::parse(["--memory=2g"].map(String::from)).unwrap();
        assert_eq!(o.memory, vec![2]);
        for bad in ["", "0G", "1.5G", "4M", "1G,1G", "100G"] {
            assert!(
                Options::parse(["--memory", bad].map(String::from)).is_err(),
                "--memory {bad:?} was accepted"
            );
        }
        assert!(Options::parse(["--memory"].map(String::from)).is_err());
    }

    pub(super) fn ratio_is_median_of_per_run_ratios() {
        let s = Series {
            scenario: "s".into(),
            metric: "m".into(),
            memory_gib: 1,
            unit: "x",
            values: vec![10.0, 30.0, 20.0],
            baselines: vec![5.0, 10.0, 20.0],
            ratios: vec![2.0, 3.0, 1.0],
            per_run: false,
        };
        let r = s.result();
        assert_eq!((r.median, r.min, r.max), (20.0, 10.0, 30.0));
        assert_eq!(r.baseline_median, Some(10.0));
        assert_eq!(r.ratio, Some(2.0));
    }
}
