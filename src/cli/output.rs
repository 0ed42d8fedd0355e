//! Rendering reports: `--json` prints exactly one JSON object on stdout;
//! otherwise readable text.

use clap::Args;
use serde::Serialize;

use super::CliError;

/// Only `--json`.
#[derive(Args, Debug, Clone)]
pub struct JsonOpt {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Writes a line to stdout. A closed pipe (`vmhop status | head -1`) is not
/// an error: the reader has what it wanted. Other write errors are.
pub fn out_line(line: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match writeln!(o, "{line}").and_then(|_| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::failed(format!("cannot write to stdout: {e}"))),
    }
}

/// Prints `v` as one JSON line.
pub fn print_json<T: Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string(v)
        .map_err(|e| CliError::failed(format!("cannot encode the report: {e}")))?;
    out_line(&s)
}

/// Prints `v` as JSON with --json, else the text `text` makes of it.
pub fn render<T: Serialize>(
    json: bool,
    v: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    if json {
        print_json(v)
    } else {
        let t = text(v);
        if t.is_empty() {
            return Ok(());
        }
        out_line(&t)
    }
}
