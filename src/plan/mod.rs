//! `cpsgate plan`: the capacity planner. A recorded trace (CSV rows or a SIP capture) is replayed
//! through the admission chain of a configuration in simulated time — the proxy's own code, with
//! `now` taken from the trace — to report what the limits would have done, the smallest limits
//! that keep refusals under a target share, and what pacing would do instead.
//!
//! Steps: [`trace`] reads and classifies the attempts into a [`replay::Store`]; [`replay`] runs
//! them under one scenario; this module runs the scenarios (as configured, the searches, the
//! recommendation, pacing) and builds the [`Report`]; [`chart`] draws one SVG per trunk.

pub mod chart;
pub mod replay;
pub mod trace;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::limiter::{ChainSpec, Limit, Stage};
use replay::{Outcome, Scenario, Scope, Seconds, Store, Tally};
use trace::{Classifier, Format, TraceStats};

/// Largest burst a bucket holds (the GCRA packs `burst - 1` into 20 bits).
const MAX_BURST: u32 = 1 << 20;

/// The highest rate the searches try (calls a microsecond apart).
const MAX_RATE: f64 = 1e6;

/// A stage that refuses nothing a trace holds: a million calls within a millisecond.
const UNBOUNDED: Limit = Limit {
    rate: 1e9,
    burst: MAX_BURST,
};

/// What to plan.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration whose limits are replayed.
    pub config: PathBuf,
    /// The trace.
    pub trace: PathBuf,
    /// Its format (detected when `None`).
    pub format: Option<Format>,
    /// Divides the trace's time axis: 2 replays the same calls in half the time.
    pub speedup: f64,
    /// Largest share of a trunk's or pool's attempts a recommended limit may refuse.
    pub target: f64,
    /// Recommended rates are multiples of this (calls per second).
    pub step: f64,
    /// The pacing what-if's `max_delay` for trunks that do not pace already.
    pub max_delay: Duration,
    /// Attempts kept in memory; a longer trace goes through a temporary file.
    pub memory_attempts: usize,
}

impl Options {
    /// Defaults for `config` and `trace`.
    pub fn new(config: impl Into<PathBuf>, trace: impl Into<PathBuf>) -> Self {
        Self {
            config: config.into(),
            trace: trace.into(),
            format: None,
            speedup: 1.0,
            target: 0.001,
            step: 1.0,
            max_delay: Duration::from_secs(5),
            memory_attempts: 4_000_000,
        }
    }
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// The trace cannot be read.
    #[error("{trace}: {source}")]
    Trace {
        /// The trace.
        trace: String,
        /// What is wrong, and where.
        source: trace::TraceError,
    },
    /// A bad option.
    #[error("{0}")]
    Option(String),
    /// Reading or writing a file.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Nothing to replay.
    #[error("{0}")]
    Empty(String),
}

/// The whole report (also its JSON form).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// What was read.
    pub trace: TraceInfo,
    /// The refusal share recommendations aim under.
    pub target_share: f64,
    /// Step of recommended rates.
    pub rate_step: f64,
    /// Per trunk, in config order.
    pub trunks: Vec<KeyReport>,
    /// Per account (pool), in config order.
    pub accounts: Vec<KeyReport>,
    /// Traffic on no trunk, limited per source (when there is any).
    pub sources: Option<KeyReport>,
    /// Per stage of the chain, as configured.
    pub stages: Vec<StageReport>,
    /// Every attempt replayed with each limit (trunk, pool, per source, per username, global) at
    /// its recommended rate.
    pub with_recommendations: Totals,
    /// What the replay cannot model for this configuration.
    pub warnings: Vec<String>,
}

/// The trace's side of the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceInfo {
    /// The file.
    pub path: String,
    /// Its format.
    pub format: Format,
    /// The time axis divisor.
    pub speedup: f64,
    /// First attempt (RFC 3339, UTC).
    pub start: String,
    /// Seconds from the first attempt to the last, after speedup.
    pub duration_secs: f64,
    /// Counts.
    #[serde(flatten)]
    pub stats: TraceStats,
    /// INVITEs re-sent with credentials after a challenge (not charged by the proxy).
    pub auth_resends: u64,
    /// True when the attempts did not fit the memory budget and were streamed from a file.
    pub streamed: bool,
}

/// Attempts and refusals of one replay.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Totals {
    /// Attempts.
    pub attempts: u64,
    /// Refused at any stage.
    pub rejected: u64,
    /// `rejected / attempts`.
    pub rejected_share: f64,
    /// Refusals by the stage that refused.
    pub rejected_by_stage: BTreeMap<&'static str, u64>,
}

/// One trunk, pool, or the traffic on no trunk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyReport {
    /// Its name.
    pub name: String,
    /// Its configured rate (calls per second).
    pub rate: f64,
    /// Its configured burst.
    pub burst: u32,
    /// Attempts.
    pub attempts: u64,
    /// Admitted.
    pub admitted: u64,
    /// Refused at any stage.
    pub rejected: u64,
    /// `rejected / attempts`.
    pub rejected_share: f64,
    /// Refusals by the stage that refused.
    pub rejected_by_stage: BTreeMap<&'static str, u64>,
    /// Busiest second of attempts.
    pub offered_peak_cps: u32,
    /// Seconds after the start of that second.
    pub offered_peak_at_secs: u64,
    /// 95th percentile of attempts per second, over every second of the trace.
    pub offered_p95_cps: u32,
    /// Busiest second of admitted calls (what a carrier billing by peak sees).
    pub admitted_peak_cps: u32,
    /// 95th percentile of admitted calls per second over every second of the trace (the
    /// measure carriers surcharge by).
    pub admitted_p95_cps: u32,
    /// Seconds with at least one refusal.
    pub rejecting_secs: u64,
    /// The longest run of consecutive seconds with refusals.
    pub longest_rejecting: Option<Stretch>,
    /// The smallest limits that keep refusals under the target.
    pub recommended: Option<Recommendation>,
    /// The same traffic paced instead of refused (trunks only).
    pub pacing: Option<PacingReport>,
    /// The chart's file name, when charts were written.
    pub chart: Option<String>,
}

/// A run of seconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Stretch {
    /// Its first second, counted from the start of the trace.
    pub start_secs: u64,
    /// Its length in seconds.
    pub secs: u64,
}

/// The smallest limits that keep refusals at or under the target share, found by bisection over
/// replays.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recommendation {
    /// The rate (a multiple of the step), at the configured burst; `None` when no rate up to a
    /// million a second meets the target: more calls arrive at one instant than the burst
    /// holds (see `burst_at_configured_rate`).
    pub rate: Option<f64>,
    /// The burst it was searched with (the configured one).
    pub burst: u32,
    /// Refusal share at that rate.
    pub rejected_share: f64,
    /// The rate one step lower and its share (over the target), unless the rate is one step.
    pub one_step_lower: Option<(f64, f64)>,
    /// The smallest burst that meets the target at the configured rate (`None`: none up to
    /// 2^20 does).
    pub burst_at_configured_rate: Option<u32>,
}

/// The pacing what-if of a trunk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PacingReport {
    /// Longest wait allowed.
    pub max_delay_secs: f64,
    /// Most calls waiting at once.
    pub max_queue: usize,
    /// Admitted, at once or after a wait.
    pub admitted: u64,
    /// Admitted after a wait.
    pub delayed: u64,
    /// Still refused (no slot within max_delay, a full queue, or a later stage).
    pub rejected: u64,
    /// `rejected / attempts`.
    pub rejected_share: f64,
    /// Median wait of admitted calls (0 for those sent at once), ms.
    pub delay_p50_ms: f64,
    /// 99th percentile wait, ms.
    pub delay_p99_ms: f64,
    /// Busiest second of calls sent to the carrier.
    pub admitted_peak_cps: u32,
}

/// One stage of the chain.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageReport {
    /// Its label.
    pub stage: &'static str,
    /// Calls that reached it.
    pub reached: u64,
    /// Calls it refused.
    pub rejected: u64,
    /// `rejected / reached`.
    pub rejected_share: f64,
    /// The per-key (source, username) or global limit, for those stages.
    pub limit: Option<(f64, u32)>,
    /// For those stages: the smallest limit that keeps the stage's refusals under the target
    /// with every other stage unbounded.
    pub recommended: Option<Recommendation>,
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The planner: the configuration, the attempts, and the scenarios run over them.
pub struct Planner {
    cfg: Config,
    opts: Options,
    store: Store,
    stats: TraceStats,
    format: Format,
}

impl Planner {
    /// Load the configuration and read the trace.
    pub fn load(opts: Options) -> Result<Self, PlanError> {
        if !(opts.speedup.is_finite() && opts.speedup > 0.0) {
            return Err(PlanError::Option(format!(
                "--speedup {}: must be a positive number",
                opts.speedup
            )));
        }
        if !(0.0..1.0).contains(&opts.target) {
            return Err(PlanError::Option(format!(
                "--target {}: must be a share from 0 to below 1 (0.001 is 0.1 %)",
                opts.target
            )));
        }
        if !(opts.step.is_finite() && opts.step >= 0.001) {
            return Err(PlanError::Option(format!(
                "--step {}: must be at least 0.001 calls per second",
                opts.step
            )));
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(300)).contains(&opts.max_delay) {
            return Err(PlanError::Option(format!(
                "--max-delay {}: must be seconds between 0.001 and 300",
                opts.max_delay.as_secs_f64()
            )));
        }
        let cfg = Config::load_for_replay(&opts.config)?;
        let trace_err = |source| PlanError::Trace {
            trace: opts.trace.display().to_string(),
            source,
        };
        let format = match opts.format {
            Some(f) => f,
            None => Format::detect(&opts.trace).map_err(|source| {
                trace_err(trace::TraceError::Io {
                    path: opts.trace.display().to_string(),
                    source,
                })
            })?,
        };
        let mut classifier = Classifier::new(&cfg, opts.speedup);
        let mut store = Store::new(opts.memory_attempts);
        let mut stored = Ok(());
        let push = |a| {
            if stored.is_ok() {
                stored = store.push(a);
            }
        };
        match format {
            Format::Csv => trace::read_csv(&opts.trace, &mut classifier, push),
            Format::Pcap => trace::read_pcap(&opts.trace, &mut classifier, push),
        }
        .map_err(trace_err)?;
        stored?;
        store.finish()?;
        if store.is_empty() {
            let s = &classifier.stats;
            return Err(PlanError::Empty(format!(
                "{}: no call attempt to replay ({} records: {} INVITEs from carriers, {} from sources the proxy would not meter, {} from the gate's own listen addresses, {} retransmissions, {} other SIP messages, {} unparsable, {} other packets)",
                opts.trace.display(),
                s.records,
                s.from_carriers,
                s.unmetered,
                s.from_gate,
                s.retransmissions,
                s.other_sip,
                s.unparsable,
                s.skipped_packets
            )));
        }
        Ok(Self {
            cfg,
            stats: classifier.stats,
            opts,
            store,
            format,
        })
    }

    /// The attempts read.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configured limits.
    pub fn spec(&self) -> ChainSpec {
        let mut spec = crate::proxy::chain_spec(&self.cfg);
        // A shared bucket's whole limit, not one gate's share of it: the trace is the traffic of
        // every gate.
        for (i, t) in self.cfg.trunks.iter().enumerate() {
            spec.trunks[i].1 = t.limit;
        }
        for (i, a) in self.cfg.accounts.iter().enumerate() {
            spec.accounts[i].1 = a.limit;
        }
        spec
    }

    /// What the replay cannot model for this configuration.
    fn warnings(&self) -> Vec<String> {
        let Some(c) = &self.cfg.cluster else {
            return Vec::new();
        };
        let local: Vec<&str> = self
            .cfg
            .trunks
            .iter()
            .filter(|t| !t.shared)
            .map(|t| t.name.as_str())
            .chain(
                self.cfg
                    .accounts
                    .iter()
                    .filter(|a| !a.shared)
                    .map(|a| a.name.as_str()),
            )
            .chain(
                (self.cfg.proxy.unknown_sources == crate::config::UnknownSources::Limit)
                    .then_some("unknown_source"),
            )
            .chain(self.cfg.limits.username.map(|_| "username"))
            .chain(self.cfg.limits.global.map(|_| "global"))
            .collect();
        if local.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "[cluster] of {} gates: {} are enforced by each gate on its own share of the traffic; the replay applies them to the whole trace as one gate would (replay one gate's traffic for those)",
            c.instances,
            local.join(", ")
        )]
    }

    /// The scenario of the configuration as it is.
    pub fn as_configured(&self) -> Scenario {
        Scenario {
            spec: self.spec(),
            pacing: self
                .cfg
                .trunks
                .iter()
                .map(|t| t.pacing.map(|p| (p.max_delay, p.max_queue)))
                .collect(),
            scope: Scope::All,
            charge_auth_retry: self.cfg.limits.charge_auth_retry,
            cache_size: self.cfg.limits.decision_cache_size,
            detail: true,
        }
    }

    /// Replay one scenario.
    pub fn replay(&self, sc: &Scenario) -> std::io::Result<Outcome> {
        replay::replay(&self.store, sc)
    }

    /// Refusal share of trunk `t` alone at `limit`.
    pub fn trunk_share(&self, t: usize, limit: Limit) -> std::io::Result<f64> {
        let mut sc = self.scoped(Scope::Trunk(t));
        sc.spec.trunks[t].1 = limit;
        let o = self.replay(&sc)?;
        Ok(share(o.trunks[t].rejected_total(), o.trunks[t].attempts))
    }

    /// Refusal share of pool `a`'s stage at `limit`, with its trunks at `trunks`.
    pub fn pool_share(&self, a: usize, trunks: &[Limit], limit: Limit) -> std::io::Result<f64> {
        let mut sc = self.scoped(Scope::Account(a));
        for (i, l) in trunks.iter().enumerate() {
            sc.spec.trunks[i].1 = *l;
        }
        sc.spec.accounts[a].1 = limit;
        let o = self.replay(&sc)?;
        let s = o.stages[Stage::Account.index()];
        Ok(share(s.rejected, s.reached))
    }

    /// Refusal share of the per-source, per-username or global stage at `limit`, every other
    /// stage unbounded.
    pub fn stage_share(&self, stage: Stage, limit: Limit) -> std::io::Result<f64> {
        let mut sc = self.scoped(Scope::Stage(stage));
        for (_, l) in sc.spec.trunks.iter_mut().chain(sc.spec.accounts.iter_mut()) {
            *l = UNBOUNDED;
        }
        sc.spec.source = UNBOUNDED;
        sc.spec.username = self.cfg.limits.username.map(|_| UNBOUNDED);
        sc.spec.global = self.cfg.limits.global.map(|_| UNBOUNDED);
        match stage {
            Stage::Source => sc.spec.source = limit,
            Stage::Username => sc.spec.username = Some(limit),
            _ => sc.spec.global = Some(limit),
        }
        let o = self.replay(&sc)?;
        let s = o.stages[stage.index()];
        Ok(share(s.rejected, s.reached))
    }

    fn scoped(&self, scope: Scope) -> Scenario {
        let mut sc = self.as_configured();
        sc.scope = scope;
        sc.detail = false;
        sc.spec.username = None;
        sc.spec.global = None;
        sc.pacing = vec![None; sc.pacing.len()];
        sc
    }

    /// Replay everything and build the report.
    pub fn report(&self) -> Result<Report, PlanError> {
        self.build().map(|(r, _, _)| r)
    }

    /// The report, and the outcomes as configured and paced (their per-second series make the
    /// charts).
    fn build(&self) -> Result<(Report, Outcome, Vec<Tally>), PlanError> {
        let opts = &self.opts;
        let spec = self.spec();
        let configured = self.replay(&self.as_configured())?;
        let span = configured.span_secs;
        // Searches: each trunk alone, then each pool behind its trunks at their recommendations.
        // Every search and what-if is an independent replay of the same attempts: they run on
        // every core.
        let trunk_rec: Vec<Option<Recommendation>> = par_map(spec.trunks.len(), |t| {
            let attempts = configured.trunks[t].attempts;
            if attempts == 0 {
                return Ok(None);
            }
            let limit = spec.trunks[t].1;
            self.recommend(limit, attempts, |l| self.trunk_share(t, l))
                .map(Some)
        })?;
        let recommended_trunks: Vec<Limit> = spec
            .trunks
            .iter()
            .zip(&trunk_rec)
            .map(|((_, l), r)| Limit {
                rate: r.as_ref().and_then(|r| r.rate).unwrap_or(l.rate),
                burst: l.burst,
            })
            .collect();
        let pool_rec: Vec<Option<Recommendation>> = par_map(spec.accounts.len(), |a| {
            let attempts = configured.accounts[a].attempts;
            if attempts == 0 {
                return Ok(None);
            }
            let limit = spec.accounts[a].1;
            self.recommend(limit, attempts, |l| {
                self.pool_share(a, &recommended_trunks, l)
            })
            .map(Some)
        })?;
        // The per-key and global stages, each searched with the others unbounded.
        let keyed: Vec<(Stage, Limit)> = [
            (Stage::Source, Some(spec.source)),
            (Stage::Username, spec.username),
            (Stage::Global, spec.global),
        ]
        .into_iter()
        .filter_map(|(s, l)| l.map(|l| (s, l)))
        .filter(|(s, _)| configured.stages[s.index()].reached > 0)
        .collect();
        let keyed_rec = par_map(keyed.len(), |i| {
            let (stage, limit) = keyed[i];
            let reached = configured.stages[stage.index()].reached;
            self.recommend(limit, reached, |l| self.stage_share(stage, l))
        })?;
        // Everything at its recommendation.
        let mut all = self.as_configured();
        all.detail = false;
        all.spec
            .trunks
            .iter_mut()
            .zip(&recommended_trunks)
            .for_each(|(t, l)| t.1 = *l);
        for (p, r) in all.spec.accounts.iter_mut().zip(&pool_rec) {
            if let Some(rate) = r.as_ref().and_then(|r| r.rate) {
                p.1.rate = rate;
            }
        }
        for ((stage, _), r) in keyed.iter().zip(&keyed_rec) {
            let Some(rate) = r.rate else { continue };
            let l = match stage {
                Stage::Source => Some(&mut all.spec.source),
                Stage::Username => all.spec.username.as_mut(),
                _ => all.spec.global.as_mut(),
            };
            if let Some(l) = l {
                l.rate = rate;
            }
        }
        let with_rec = self.replay(&all)?;
        // Each trunk paced instead, alone (the others as configured): a paced trunk books
        // slots ahead in the pools it shares, so pacing every trunk at once would answer
        // another question.
        let paced: Vec<Tally> = par_map(spec.trunks.len(), |t| {
            if configured.trunks[t].attempts == 0 {
                return Ok(Tally::default());
            }
            let mut sc = self.as_configured();
            sc.pacing[t] = Some(paced_setting(&self.cfg, t, opts.max_delay));
            Ok(self.replay(&sc)?.trunks.swap_remove(t))
        })?;

        let key = |name: &str, limit: Limit, t: &Tally| key_report(name, limit, t, span);
        let mut trunks: Vec<KeyReport> = Vec::new();
        for (i, (name, limit)) in spec.trunks.iter().enumerate() {
            let mut k = key(name, *limit, &configured.trunks[i]);
            k.recommended = trunk_rec[i].clone();
            let p = &paced[i];
            if p.attempts > 0 {
                let (max_delay, max_queue) = paced_setting(&self.cfg, i, opts.max_delay);
                k.pacing = Some(PacingReport {
                    max_delay_secs: max_delay.as_secs_f64(),
                    max_queue,
                    admitted: p.admitted,
                    delayed: p.delayed,
                    rejected: p.rejected_total(),
                    rejected_share: share(p.rejected_total(), p.attempts),
                    delay_p50_ms: p.delay_quantile_ms(0.5),
                    delay_p99_ms: p.delay_quantile_ms(0.99),
                    admitted_peak_cps: p.seconds.as_ref().map_or(0, |s| s.admitted_peak.0),
                });
            }
            trunks.push(k);
        }
        let accounts = spec
            .accounts
            .iter()
            .enumerate()
            .map(|(i, (name, limit))| {
                let mut k = key(name, *limit, &configured.accounts[i]);
                k.recommended = pool_rec[i].clone();
                k
            })
            .collect();
        let sources = (configured.sources.attempts > 0)
            .then(|| key("(no trunk, per source)", spec.source, &configured.sources));
        let stages = Stage::ALL
            .iter()
            .map(|s| {
                let c = configured.stages[s.index()];
                let searched = keyed.iter().position(|(k, _)| k == s);
                StageReport {
                    stage: s.as_str(),
                    reached: c.reached,
                    rejected: c.rejected,
                    rejected_share: share(c.rejected, c.reached),
                    limit: searched.map(|i| (keyed[i].1.rate, keyed[i].1.burst)),
                    recommended: searched.map(|i| keyed_rec[i].clone()),
                }
            })
            .filter(|s| s.reached > 0)
            .collect();
        let report = Report {
            trace: TraceInfo {
                path: opts.trace.display().to_string(),
                format: self.format,
                speedup: opts.speedup,
                start: trace::format_timestamp(self.stats.start_unix_ns),
                duration_secs: self.stats.span_ns as f64 / 1e9,
                stats: self.stats.clone(),
                auth_resends: configured.auth_resends,
                streamed: self.store.spilled(),
            },
            target_share: opts.target,
            rate_step: opts.step,
            trunks,
            accounts,
            sources,
            stages,
            warnings: self.warnings(),
            with_recommendations: Totals {
                attempts: with_rec.attempts(),
                rejected: with_rec.rejected(),
                rejected_share: share(with_rec.rejected(), with_rec.attempts()),
                rejected_by_stage: by_stage(&with_rec.stages.map(|s| s.rejected)),
            },
        };
        Ok((report, configured, paced))
    }

    /// The smallest burst at `limit`'s rate whose replay meets the target, if one up to the
    /// number of attempts (which admits them all) or 2^20 does.
    fn burst_needed(
        &self,
        limit: Limit,
        attempts: u64,
        eval: &impl Fn(Limit) -> std::io::Result<f64>,
    ) -> std::io::Result<Option<u32>> {
        let target = self.opts.target;
        let share = |burst: u32| {
            eval(Limit {
                rate: limit.rate,
                burst,
            })
        };
        let cap = u32::try_from(attempts)
            .unwrap_or(MAX_BURST)
            .clamp(1, MAX_BURST);
        if share(cap)? > target {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0u32, cap);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if share(mid)? <= target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Ok(Some(hi))
    }

    /// The smallest rate (a multiple of the step, at `limit`'s burst) whose replay meets the
    /// target, and the smallest burst at `limit`'s rate that does.
    fn recommend(
        &self,
        limit: Limit,
        attempts: u64,
        eval: impl Fn(Limit) -> std::io::Result<f64>,
    ) -> std::io::Result<Recommendation> {
        let target = self.opts.target;
        let step = self.opts.step;
        let mut seen: HashMap<u64, f64> = HashMap::new();
        let mut at = |k: u64| -> std::io::Result<f64> {
            if let Some(s) = seen.get(&k) {
                return Ok(*s);
            }
            let s = eval(Limit {
                rate: k as f64 * step,
                burst: limit.burst,
            })?;
            seen.insert(k, s);
            Ok(s)
        };
        // `lo` fails (0: no rate), `hi` meets the target.
        let start = ((limit.rate / step).ceil() as u64).max(1);
        let (mut lo, mut hi) = if at(start)? <= target {
            (0, start)
        } else {
            (start, start * 2)
        };
        // A million calls a second spaces calls a microsecond apart: beyond it only the burst
        // can help (calls at one instant, as in a trace with whole-second timestamps).
        while at(hi)? > target {
            if hi as f64 * step >= MAX_RATE {
                return Ok(Recommendation {
                    rate: None,
                    burst: limit.burst,
                    rejected_share: at(hi)?,
                    one_step_lower: None,
                    burst_at_configured_rate: self.burst_needed(limit, attempts, &eval)?,
                });
            }
            lo = hi;
            hi *= 2;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if at(mid)? <= target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let rejected_share = at(hi)?;
        let one_step_lower = if lo >= 1 {
            Some((lo as f64 * step, at(lo)?))
        } else {
            None
        };
        let burst_at_configured_rate = self.burst_needed(limit, attempts, &eval)?;
        Ok(Recommendation {
            rate: Some(hi as f64 * step),
            burst: limit.burst,
            rejected_share,
            one_step_lower,
            burst_at_configured_rate,
        })
    }

    /// The chart series of every trunk with traffic, from the outcomes as configured and paced.
    fn series(&self, configured: &Outcome, paced: &[Tally]) -> Vec<chart::Series> {
        let series = |kind, name: &str, rate, t: &Tally, p: Option<&Tally>| {
            let s = t.seconds.clone().unwrap_or_default();
            let p = p.and_then(|p| p.seconds.clone()).unwrap_or_default();
            chart::Series {
                kind,
                name: name.to_owned(),
                rate,
                bin_secs: s.bin,
                offered: s.series.iter().map(|b| b[0]).collect(),
                admitted: s.series.iter().map(|b| b[1]).collect(),
                paced_bin_secs: p.bin,
                paced: p.series.iter().map(|b| b[1]).collect(),
            }
        };
        let trunks = self.cfg.trunks.iter().enumerate().filter_map(|(i, t)| {
            let c = &configured.trunks[i];
            (c.attempts > 0).then(|| series("trunk", &t.name, t.limit.rate, c, Some(&paced[i])))
        });
        let pools = self.cfg.accounts.iter().enumerate().filter_map(|(i, a)| {
            let c = &configured.accounts[i];
            (c.attempts > 0).then(|| series("pool", &a.name, a.limit.rate, c, None))
        });
        trunks.chain(pools).collect()
    }
}

/// `f` over `0..n` on every core, the results in order.
fn par_map<T: Send>(
    n: usize,
    f: impl Fn(usize) -> std::io::Result<T> + Sync,
) -> std::io::Result<Vec<T>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .min(n)
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = f(i);
                    done.lock().unwrap_or_else(|e| e.into_inner()).push((i, r));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The pacing of trunk `t` in the what-if: its own when it paces, else `max_delay` and the
/// default queue of 1000.
fn paced_setting(cfg: &Config, t: usize, max_delay: Duration) -> (Duration, usize) {
    cfg.trunks[t]
        .pacing
        .map_or((max_delay, 1000), |p| (p.max_delay, p.max_queue))
}

fn by_stage(counts: &[u64; 5]) -> BTreeMap<&'static str, u64> {
    Stage::ALL
        .iter()
        .filter(|st| counts[st.index()] > 0)
        .map(|st| (st.as_str(), counts[st.index()]))
        .collect()
}

fn stages_text(m: &BTreeMap<&'static str, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    Stage::ALL
        .iter()
        .filter_map(|s| m.get(s.as_str()).map(|n| format!("{} {n}", s.as_str())))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_report(name: &str, limit: Limit, t: &Tally, span: u64) -> KeyReport {
    let s = t.seconds.clone().unwrap_or_default();
    let rejected = t.rejected_total();
    KeyReport {
        name: name.to_owned(),
        rate: limit.rate,
        burst: limit.burst,
        attempts: t.attempts,
        admitted: t.admitted,
        rejected,
        rejected_share: share(rejected, t.attempts),
        rejected_by_stage: by_stage(&t.rejected),
        offered_peak_cps: s.offered_peak.0,
        offered_peak_at_secs: s.offered_peak.1,
        offered_p95_cps: Seconds::quantile(&s.offered_hist, span, 0.95),
        admitted_peak_cps: s.admitted_peak.0,
        admitted_p95_cps: Seconds::quantile(&s.admitted_hist, span, 0.95),
        rejecting_secs: s.rejecting_seconds,
        longest_rejecting: s
            .longest_rejecting
            .map(|(start_secs, secs)| Stretch { start_secs, secs }),
        recommended: None,
        pacing: None,
        chart: None,
    }
}

/// Run `cpsgate plan`: the report, the table on standard output, and with `out` the JSON, the
/// table and one chart per trunk and pool in that directory; `json` also writes the JSON there (`-` for
/// standard output, instead of the table).
pub fn run(opts: Options, out: Option<&Path>, json: Option<&Path>) -> Result<Report, PlanError> {
    let planner = Planner::load(opts)?;
    let (mut report, configured, paced) = planner.build()?;
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
        let series = planner.series(&configured, &paced);
        let mut used = Vec::new();
        for s in &series {
            let file = chart::file_name(s.kind, &s.name, &used);
            chart::draw(s, &dir.join(&file)).map_err(std::io::Error::other)?;
            let keys = match s.kind {
                "trunk" => &mut report.trunks,
                _ => &mut report.accounts,
            };
            if let Some(k) = keys.iter_mut().find(|k| k.name == s.name) {
                k.chart = Some(file.clone());
            }
            used.push(file);
        }
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?,
        )?;
        std::fs::write(dir.join("report.txt"), table(&report))?;
    }
    match json {
        Some(p) if p == Path::new("-") => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?
            );
        }
        Some(p) => {
            std::fs::write(
                p,
                serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?,
            )?;
            print!("{}", table(&report));
        }
        None => print!("{}", table(&report)),
    }
    Ok(report)
}

fn pct(x: f64) -> String {
    let p = x * 100.0;
    if p == 0.0 {
        "0 %".into()
    } else if p < 0.01 {
        "<0.01 %".into()
    } else {
        format!("{p:.2} %")
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x}")
    }
}

/// The recommended rate, or why there is none.
fn needs(r: &Recommendation, each: &str) -> String {
    match r.rate {
        Some(rate) => format!("{} cps{each}", num(rate)),
        None => format!("none at burst {}", r.burst),
    }
}

fn stretch(s: Option<Stretch>) -> String {
    s.map_or("-".into(), |s| {
        format!("{} s at +{} s", s.secs, s.start_secs)
    })
}

/// Columns of text, left-aligned first column, right-aligned others.
fn columns(out: &mut String, rows: &[Vec<String>]) {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// The report as a terminal table.
pub fn table(r: &Report) -> String {
    let mut o = String::new();
    let t = &r.trace;
    let _ = writeln!(
        o,
        "{}: {} attempts over {:.1} s from {}{}",
        t.path,
        t.stats.attempts - t.auth_resends,
        t.duration_secs,
        t.start,
        if t.speedup == 1.0 {
            String::new()
        } else {
            format!(" (time compressed {}x)", t.speedup)
        }
    );
    let mut notes = Vec::new();
    for (n, what) in [
        (t.stats.retransmissions, "retransmissions (not new calls)"),
        (
            t.auth_resends,
            "re-sends with credentials after a challenge (not charged)",
        ),
        (t.stats.from_carriers, "INVITEs from carriers (not metered)"),
        (
            t.stats.from_gate,
            "INVITEs sent from the configuration's listen addresses (a gate's own copies)",
        ),
        (
            t.stats.unmetered,
            "INVITEs from the PBX or unknown sources the proxy would not meter",
        ),
        (
            t.stats.unparsable,
            "packets that are not SIP the proxy would take",
        ),
    ] {
        if n > 0 {
            notes.push(format!("{n} {what}"));
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(o, "  also: {}", notes.join("; "));
    }
    if t.stats.spread_whole_seconds {
        let _ = writeln!(
            o,
            "  timestamps are whole seconds: each second's attempts were spread evenly over it"
        );
    }
    for w in &r.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    let _ = writeln!(o);
    let head = |first: &str| {
        vec![
            first.to_owned(),
            "limit".into(),
            "attempts".into(),
            "rejected".into(),
            "share".into(),
            "refused at".into(),
            "peak/s".into(),
            "p95/s".into(),
            "longest rejecting".into(),
            format!("needs (≤{})", pct(r.target_share)),
            "or burst".into(),
        ]
    };
    let row = |k: &KeyReport| {
        let rec = k.recommended.as_ref();
        vec![
            k.name.clone(),
            format!("{}/{}", num(k.rate), k.burst),
            k.attempts.to_string(),
            k.rejected.to_string(),
            pct(k.rejected_share),
            stages_text(&k.rejected_by_stage),
            format!("{}→{}", k.offered_peak_cps, k.admitted_peak_cps),
            k.admitted_p95_cps.to_string(),
            stretch(k.longest_rejecting),
            rec.map_or("-".into(), |r| needs(r, "")),
            rec.map_or("-".into(), |r| {
                r.burst_at_configured_rate
                    .map_or("none".into(), |b| b.to_string())
            }),
        ]
    };
    let mut rows = vec![head("trunk")];
    rows.extend(r.trunks.iter().filter(|k| k.attempts > 0).map(row));
    columns(&mut o, &rows);
    if r.accounts.iter().any(|k| k.attempts > 0) {
        let _ = writeln!(o);
        let mut rows = vec![head("account (pool)")];
        rows.extend(r.accounts.iter().filter(|k| k.attempts > 0).map(row));
        columns(&mut o, &rows);
    }
    if let Some(s) = &r.sources {
        let _ = writeln!(o);
        let mut rows = vec![head("no trunk")];
        rows.push(row(s));
        columns(&mut o, &rows);
    }
    let _ = writeln!(o);
    let mut rows = vec![vec![
        "stage".to_owned(),
        "reached".into(),
        "rejected".into(),
        "share".into(),
        "limit".into(),
        format!("needs (≤{})", pct(r.target_share)),
        "or burst".into(),
    ]];
    rows.extend(r.stages.iter().map(|s| {
        // Source and username limits hold for each key.
        let each = if s.stage == "global" { "" } else { " each" };
        let rec = s.recommended.as_ref();
        vec![
            s.stage.to_owned(),
            s.reached.to_string(),
            s.rejected.to_string(),
            pct(s.rejected_share),
            s.limit
                .map_or("-".into(), |(r, b)| format!("{}/{b}{each}", num(r))),
            rec.map_or("-".into(), |r| needs(r, each)),
            rec.map_or("-".into(), |r| {
                r.burst_at_configured_rate
                    .map_or("none".into(), |b| b.to_string())
            }),
        ]
    }));
    columns(&mut o, &rows);
    let _ = writeln!(o);
    let mut rows = vec![vec![
        "paced instead (alone)".to_owned(),
        "max delay".into(),
        "delayed".into(),
        "p50 wait".into(),
        "p99 wait".into(),
        "still rejected".into(),
        "peak/s".into(),
    ]];
    rows.extend(r.trunks.iter().filter_map(|k| {
        let p = k.pacing.as_ref()?;
        Some(vec![
            k.name.clone(),
            format!("{} s", num(p.max_delay_secs)),
            p.delayed.to_string(),
            format!("{} ms", p.delay_p50_ms),
            format!("{} ms", p.delay_p99_ms),
            format!("{} ({})", p.rejected, pct(p.rejected_share)),
            p.admitted_peak_cps.to_string(),
        ])
    }));
    columns(&mut o, &rows);
    let _ = writeln!(o);
    let w = &r.with_recommendations;
    let _ = writeln!(
        o,
        "With every limit at its recommended rate: {} of {} attempts rejected ({}){}.",
        w.rejected,
        w.attempts,
        pct(w.rejected_share),
        if w.rejected > 0 {
            format!(", at {}", stages_text(&w.rejected_by_stage))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "peak/s: busiest second offered→admitted; p95/s: 95th percentile of admitted calls per second over every second of the trace."
    );
    o
}
