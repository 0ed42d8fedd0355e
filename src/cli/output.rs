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

/// Prints `v` as one JSON line.
pub fn print_json<T: Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string(v)
        .map_err(|e| CliError::failed(format!("cannot encode the report: {e}")))?;
    println!("{s}");
    Ok(())
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
        if !t.is_empty() {
            println!("{t}");
        }
        Ok(())
    }
}
