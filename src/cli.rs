//! Command line: `run`, `check-config`, and the logging flags. `main` only maps the outcome to an
//! exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{Gate, shutdown_signal};
use crate::config::Config;
use crate::telemetry::{LogFormat, init_logging};

/// Exit code for an invalid configuration (as `check-config` and `run` report it).
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure at start (bind, resolve) or while running.
pub const EXIT_RUNTIME: u8 = 1;

/// cpsgate: a SIP proxy that enforces carrier calls-per-second limits.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value = "pretty", global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,cpsgate=debug`); overrides RUST_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "config/cpsgate.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and report every error in it.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
    },
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    init_logging(cli.log_format, cli.log.as_deref());
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} listener(s), {} upstream(s), {} account(s), {} trunk(s))",
                    file.display(),
                    cfg.listeners.len(),
                    cfg.upstreams.len(),
                    cfg.accounts.len(),
                    cfg.trunks.len()
                );
                for w in &cfg.warnings {
                    println!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            // The config is read and validated before anything is bound.
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let result = runtime.block_on(async {
                let shutdown = shutdown_signal();
                let gate = Gate::bind(&cfg).await?.watch(config.clone());
                gate.run(shutdown).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cpsgate: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}
