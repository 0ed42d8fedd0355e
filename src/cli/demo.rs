//! `vmhop demo`: placeholder, filled in below.
use clap::Args;

/// Options of `vmhop demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {}

/// Runs the demo.
pub fn demo(_a: DemoArgs) -> super::CliResult {
    Ok(())
}
