//! Command line: `run`, `check-config`, and the logging flags. `main` only maps the outcome to an
//! exit code.

/// `eprintln!` that never panics: with stderr gone (a full disk, a closed pipe) the message is
/// lost but the exit code still says what happened.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
    /// Offer calls to a gate, playing the PBX (and with --uas the carrier too); one line per
    /// second, a summary at the end.
    Load {
        /// The gate's SIP address.
        #[arg(long)]
        gate: std::net::SocketAddr,
        /// Transport to and from the gate.
        #[arg(long, value_parser = ["udp", "tcp"], default_value = "udp")]
        transport: String,
        /// Target calls per second.
        #[arg(long, default_value_t = 100.0)]
        cps: f64,
        /// Seconds of load (default 10, unless --calls is given).
        #[arg(long)]
        duration: Option<f64>,
        /// Number of calls (instead of a duration).
        #[arg(long)]
        calls: Option<u64>,
        /// Local address of the PBX side.
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: std::net::SocketAddr,
        /// Also play the carrier on this address (the gate's upstream for the PBX's trunk).
        #[arg(long)]
        uas: Option<std::net::SocketAddr>,
        /// Seconds to wait for late answers after the last INVITE.
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
        /// Write the summary as JSON to this file (`-` for standard output).
        #[arg(long)]
        json: Option<PathBuf>,
        /// No per-second lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Replay a traffic trace through a configuration's limits in simulated time: what they
    /// would refuse, the smallest limits that keep refusals under a target, and what pacing
    /// would do instead.
    Plan {
        /// Configuration whose trunks, accounts and limits are replayed.
        #[arg(long, short)]
        config: PathBuf,
        /// The trace: a CSV of `timestamp, source_ip, sip_username, trunk, call_id`, or a pcap /
        /// pcapng capture of SIP over UDP.
        #[arg(long)]
        trace: PathBuf,
        /// The trace's format (default: pcap or pcapng by magic number, else CSV).
        #[arg(long, value_parser = ["csv", "pcap"])]
        format: Option<String>,
        /// Compress the trace's time axis: 2 replays the same calls in half the time.
        #[arg(long, default_value_t = 1.0)]
        speedup: f64,
        /// Write report.json, report.txt and one SVG chart per trunk and per pool to this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the report as JSON to this file (`-`: standard output, instead of the
        /// table).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Largest share of attempts a recommended limit may refuse.
        #[arg(long, default_value_t = 0.001)]
        target: f64,
        /// Recommended rates are multiples of this many calls per second.
        #[arg(long, default_value_t = 1.0)]
        step: f64,
        /// Seconds a call may wait in the pacing what-if (trunks already pacing keep theirs).
        #[arg(long, default_value_t = 5.0)]
        max_delay: f64,
        /// Attempts kept in memory; a longer trace is streamed from a temporary file.
        #[arg(long, default_value_t = 4_000_000)]
        memory_attempts: usize,
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
                report!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Load {
            gate,
            transport,
            cps,
            duration,
            calls,
            bind,
            uas,
            drain,
            json,
            quiet,
        } => {
            let bad = |what: &str| {
                report!("cpsgate load: {what}");
                ExitCode::from(EXIT_CONFIG)
            };
            if !(cps.is_finite() && cps > 0.0 && cps <= 10_000_000.0) {
                return bad("--cps must be a rate above 0");
            }
            if duration.is_some_and(|d| !(d.is_finite() && d > 0.0 && d <= 86_400.0)) {
                return bad("--duration must be seconds above 0 (at most a day)");
            }
            if calls == Some(0) || calls.is_some_and(|c| c > 100_000_000) {
                return bad("--calls must be between 1 and 100000000");
            }
            if !(drain.is_finite() && (0.0..=300.0).contains(&drain)) {
                return bad("--drain must be seconds between 0 and 300");
            }
            let args = crate::load::LoadArgs {
                gate,
                tcp: transport == "tcp",
                cps,
                calls,
                duration,
                uac: bind,
                uas,
                drain: std::time::Duration::from_secs_f64(drain),
                live: !quiet,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    report!("cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            match runtime.block_on(crate::load::run(args)) {
                Ok(s) => {
                    println!(
                        "offered {} calls in {:.2} s ({:.1} CPS, target {}): reached the carrier {}, answered {}, completed {}, refused {:?}, lost {}; latency to first answer p50 {:.3} ms, p99 {:.3} ms",
                        s.offered,
                        s.seconds,
                        s.offered_cps,
                        s.target_cps,
                        s.reached,
                        s.answered,
                        s.completed,
                        s.refused,
                        s.lost,
                        s.p50_ms,
                        s.p99_ms
                    );
                    if let Some(path) = json {
                        let text = serde_json::to_string_pretty(&s).unwrap_or_default();
                        if path.as_os_str() == "-" {
                            println!("{text}");
                        } else if let Err(e) = std::fs::write(&path, text) {
                            report!("cpsgate load: writing {}: {e}", path.display());
                            return ExitCode::from(EXIT_RUNTIME);
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report!("cpsgate load: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Plan {
            config,
            trace,
            format,
            speedup,
            out,
            json,
            target,
            step,
            max_delay,
            memory_attempts,
        } => {
            if !(max_delay.is_finite() && max_delay > 0.0 && max_delay <= 300.0) {
                report!(
                    "cpsgate plan: --max-delay {max_delay}: must be seconds between 0.001 and 300"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            let opts = crate::plan::Options {
                format: format.map(|f| match f.as_str() {
                    "pcap" => crate::plan::trace::Format::Pcap,
                    _ => crate::plan::trace::Format::Csv,
                }),
                speedup,
                target,
                step,
                max_delay: std::time::Duration::from_secs_f64(max_delay),
                memory_attempts: memory_attempts.max(1),
                ..crate::plan::Options::new(config, trace)
            };
            match crate::plan::run(opts, out.as_deref(), json.as_deref()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(
                    e @ (crate::plan::PlanError::Config(_) | crate::plan::PlanError::Option(_)),
                ) => {
                    report!("cpsgate plan: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    report!("cpsgate plan: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Run { config } => {
            // The config is read and validated before anything is bound.
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    report!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    report!("cannot start the runtime: {e}");
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
                    report!("cpsgate: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}
