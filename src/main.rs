//! The `cpsgate` binary: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    cpsgate::cli::run(cpsgate::cli::Cli::parse())
}
