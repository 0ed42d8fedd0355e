//! `migrate`, `migrate-cancel` (clients of the source's API) and the
//! destination side of `run --incoming`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::control::{request, QUICK_TIMEOUT};
use super::output::render;
use super::run::{Frontend, RunArgs};
use super::{ApiOpts, AuthArgs, CliError, CliResult};
use crate::api::server::{error_body, ApiHandler};
use crate::api::PREFIX;
use crate::migration::destination::{self, IncomingOptions, IncomingReport, IncomingStatus};
use crate::migration::source::{security_of, MigrateReport, MigrateRequest};
use crate::migration::{check_policy, Address, Compression, Listener};

/// Options of `vmhop migrate`.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    api: ApiOpts,
    /// Destination: tcp://HOST:PORT or unix:PATH (a `vmhop run --incoming` there).
    #[arg(long, value_name = "ADDRESS")]
    to: String,
    /// Downtime budget of the last round in milliseconds (default 5).
    #[arg(long, value_name = "MS")]
    max_downtime_ms: Option<f64>,
    /// Cancel the migration after this many seconds (the VM runs on here).
    #[arg(long, value_name = "S")]
    timeout: Option<f64>,
    /// Compression of page data: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compress: Compression,
    #[command(flatten)]
    auth: AuthArgs,
}

/// A path the VM's process can open whatever its working directory.
fn absolute(p: &Option<PathBuf>) -> Result<Option<PathBuf>, CliError> {
    p.as_ref()
        .map(|p| {
            std::path::absolute(p).map_err(|e| CliError::usage(format!("{}: {e}", p.display())))
        })
        .transpose()
}

/// Polls the source's progress for the bar, until the migration ends.
fn show_progress(api: &ApiOpts, to: &str) -> Option<std::thread::JoinHandle<()>> {
    use std::io::IsTerminal;
    if api.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let api = api.clone();
    let to = to.to_string();
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} migrating to {msg} {bytes}/{total_bytes} sent ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(to);
            let mut seen = false;
            loop {
                let p: Result<Value, _> =
                    request(&api, "GET", "vm.migration", None, Some(QUICK_TIMEOUT));
                let Ok(p) = p else { break };
                let going = p["in_progress"].as_bool().unwrap_or(false);
                if !going && seen {
                    break;
                }
                seen |= going;
                bar.set_length(p["memory_bytes"].as_u64().unwrap_or(0));
                bar.set_position(p["page_bytes_sent"].as_u64().unwrap_or(0));
                std::thread::sleep(Duration::from_millis(200));
            }
            bar.finish_and_clear();
        })
        .ok()
}

/// `vmhop migrate`.
pub fn migrate(a: &MigrateArgs) -> CliResult {
    let to: Address = a.to.parse().map_err(CliError::usage)?;
    let req = MigrateRequest {
        to: to.to_string(),
        max_downtime_ms: a.max_downtime_ms,
        timeout_s: a.timeout,
        compress: a.compress,
        auth_key_file: absolute(&a.auth.auth_key_file)?,
        tls_cert: absolute(&a.auth.tls_cert)?,
        tls_key: absolute(&a.auth.tls_key)?,
        tls_ca: absolute(&a.auth.tls_ca)?,
        insecure: a.auth.insecure,
    };
    // The VM's process checks the same; checking here too makes a wrong
    // request a usage error (exit 2) before anything is sent.
    crate::migration::source::validate(&req).map_err(CliError::usage)?;
    let body = serde_json::to_value(&req).map_err(CliError::failed)?;
    let progress = show_progress(&a.api, &a.to);
    let r: Result<MigrateReport, _> = request(&a.api, "PUT", "vm.migrate", Some(body), None);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let r = r?;
    render(a.api.json, &r, |r| {
        let mut t = format!(
            "migrated to {}: downtime {} µs, {:.1} ms in all, {} round(s), {} pages ({} zero), {} on the wire at {:.0} MiB/s",
            r.to,
            r.downtime_us,
            r.total_ms,
            r.rounds,
            r.pages_sent,
            r.zero_pages,
            crate::util::format_size(r.bytes_sent),
            r.link_mib_s
        );
        if r.throttle_max_percent > 0 {
            t += &format!(
                "\n  the guest was throttled up to {} %",
                r.throttle_max_percent
            );
        }
        if !r.converged {
            t += "\n  the dirty rate did not converge: the last round was a bounded stop-copy";
        }
        t
    })
}

/// `vmhop migrate-cancel`.
pub fn cancel(o: &ApiOpts) -> CliResult {
    let v: Value = request(o, "PUT", "vm.migrate-cancel", None, Some(QUICK_TIMEOUT))?;
    render(o.json, &v, |_| {
        "migration cancelled; the VM runs on here".into()
    })
}

/// The API of a destination still waiting for its VM.
struct Waiting {
    name: String,
    listening: String,
    status: Arc<IncomingStatus>,
    stop: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
}

impl ApiHandler for Waiting {
    fn handle(&self, method: &str, path: &str, _body: &[u8]) -> (u16, Value) {
        let ep = path.strip_prefix(PREFIX).and_then(|p| p.strip_prefix('/'));
        match (method, ep) {
            ("GET", Some("vm.status")) => {
                let s = &self.status;
                let r = IncomingReport {
                    name: self.name.clone(),
                    state: "incoming".into(),
                    listening: self.listening.clone(),
                    source: s.peer.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                    bytes_received: s.bytes.load(Ordering::Relaxed),
                    pages_received: s.pages.load(Ordering::Relaxed),
                    last_error: s
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                    pid: std::process::id(),
                };
                (200, serde_json::to_value(r).unwrap_or(Value::Null))
            }
            ("PUT", Some("vm.stop")) => {
                let _ = self.stop.lock().unwrap_or_else(|e| e.into_inner()).send(());
                (200, serde_json::json!({"state": "stopped"}))
            }
            (_, Some(_)) => (
                409,
                error_body(format!(
                    "no VM here yet: this vmhop waits for an incoming migration on {}",
                    self.listening
                )),
            ),
            _ => (404, error_body(format!("no such endpoint: {path}"))),
        }
    }
}

/// `--numa guest-node=G,host-node=H` of an incoming VM.
fn rebind(specs: &[String]) -> Result<std::collections::BTreeMap<u32, u32>, CliError> {
    let mut out = std::collections::BTreeMap::new();
    for s in specs {
        let (mut g, mut h) = (None, None);
        for kv in s.split(',') {
            match kv.split_once('=') {
                Some(("guest-node", v)) => g = v.parse::<u32>().ok(),
                Some(("host-node", v)) => h = v.parse::<u32>().ok(),
                _ => {
                    return Err(CliError::usage(format!(
                        "--numa {s}: with --incoming, give guest-node=G,host-node=H (sizes come from the source)"
                    )))
                }
            }
        }
        match (g, h) {
            (Some(g), Some(h)) => {
                out.insert(g, h);
            }
            _ => {
                return Err(CliError::usage(format!(
                    "--numa {s}: expected guest-node=G,host-node=H with numbers"
                )))
            }
        }
    }
    Ok(out)
}

/// `vmhop run --incoming ADDRESS`: waits for a VM, then runs it.
pub fn incoming(addr: &str, args: &RunArgs) -> CliResult {
    args.reject_config_for_incoming()?;
    let listen: Address = addr.parse().map_err(CliError::usage)?;
    let security = security_of(
        &args.auth.auth_key_file,
        &args.auth.tls_cert,
        &args.auth.tls_key,
        &args.auth.tls_ca,
    )
    .map_err(CliError::usage)?;
    check_policy(&listen, &security, args.auth.insecure).map_err(CliError::usage)?;
    let opts = IncomingOptions {
        rebind: rebind(&args.numa)?,
        once: args.once,
    };
    let socket = args.socket();
    super::run::check_socket_free(&socket)?;
    let listener = Listener::bind(&listen).map_err(CliError::failed)?;
    let listening = listener.local_address().to_string();
    let set = super::run::block_stop_signals();
    let status = Arc::new(IncomingStatus::default());
    let fe = Frontend::start(&socket, set, |tx| {
        Arc::new(Waiting {
            name: args.name.clone(),
            listening: listening.clone(),
            status: status.clone(),
            stop: std::sync::Mutex::new(tx),
        })
    })?;
    if args.json {
        super::output::print_json(&serde_json::json!({
            "state": "incoming", "listening": listening, "api_socket": socket,
            "pid": std::process::id(),
        }))?;
    } else {
        super::output::out_line(&format!(
            "vmhop: waiting for an incoming migration on {listening} ({}), API socket {}",
            security.describe(),
            socket.display()
        ))?;
    }
    // The VM's routes answer from the moment it runs here, before the
    // source is told (and its `migrate` returns); back to waiting if the
    // source could not be told.
    let (switch, stop) = fe.handoff();
    let waiting: Arc<dyn ApiHandler> = Arc::new(Waiting {
        name: args.name.clone(),
        listening: listening.clone(),
        status: status.clone(),
        stop: std::sync::Mutex::new(stop.clone()),
    });
    *status.on_arrival.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Box::new(move |vm: Option<&Arc<crate::vmm::Vm>>| match vm {
            Some(vm) => switch.set(Arc::new(crate::api::routes::Routes::new(
                vm.clone(),
                stop.clone(),
            ))),
            None => switch.set(waiting.clone()),
        }));
    let console = args.console_target();
    let (tx, rx) = std::sync::mpsc::channel();
    let st = status.clone();
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let r = destination::receive(&listener, &security, &opts, &st, &console);
            let _ = tx.send(r);
        })
        .map_err(|e| CliError::failed(format!("cannot start the receiver: {e}")))?;
    let arrived = loop {
        if fe.stopped_within(Duration::from_millis(50)) {
            return Ok(());
        }
        match rx.try_recv() {
            Ok(r) => break r,
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                return Err(CliError::failed("the receiver thread ended"))
            }
        }
    };
    let (vm, devs, report) = arrived.map_err(CliError::failed)?;
    if let Some(port) = devs.serial {
        crate::devices::serial::forward_stdin(port);
    }
    if !args.json {
        super::output::out_line(&format!(
            "vmhop: VM '{}' arrived from {} ({} pages, {}), running after {:.1} ms",
            vm.config().name,
            report.source,
            report.pages_received,
            crate::util::format_size(report.bytes_received),
            report.start_ms
        ))?;
    }
    super::run::serve_on(
        vm,
        fe,
        &socket,
        args.json,
        Some(serde_json::to_value(&report).map_err(CliError::failed)?),
        Some(devs.console_bytes),
    )
}
