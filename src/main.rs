//! The `vmhop` command: parses the command line and hands it to `cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    vmhop::cli::main()
}
