//! The `vmhop` command: hands the command line to `cli`, with the service
//! as the in-process half it drives (`api::run::Local`).

use std::process::ExitCode;

fn main() -> ExitCode {
    vmhop::cli::main(&vmhop::service::Service)
}
