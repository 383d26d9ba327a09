//! The Prometheus text exposition of the gate's counters. Everything is read from atomics that
//! exist from start (the `Stats` counters, each trunk's and account's `KeyStats`); a scrape
//! formats them, the SIP path never looks anything up.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::limiter::Stage;
use crate::proxy::{DropReason, Proxy};
use crate::telemetry::{Histogram, Stats, TransportDrop};

/// Escape a label value (`\`, `"` and newlines, per the exposition format).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

const CLASSES: [&str; 7] = ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx"];

/// A histogram of nanosecond durations as a Prometheus histogram in seconds.
fn histogram(o: &mut Out, name: &str, help: &str, h: &Histogram) {
    o.family(name, "histogram", help);
    let (buckets, sum_ns) = h.read();
    let mut cumulative = 0;
    for (i, n) in buckets.iter().enumerate() {
        cumulative += n;
        let le = h
            .bounds()
            .get(i)
            .map_or("+Inf".to_owned(), |b| format!("{}", *b as f64 / 1e9));
        o.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative);
    }
    o.sample(&format!("{name}_sum"), &[], sum_ns as f64 / 1e9);
    o.sample(&format!("{name}_count"), &[], cumulative);
}

/// Render every metric.
pub fn render(stats: &Stats, proxy: &Proxy, now: Instant) -> String {
    let mut o = Out(String::with_capacity(8192));
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

    o.family(
        "cpsgate_messages_received_total",
        "counter",
        "SIP messages handed to the decision core.",
    );
    o.sample(
        "cpsgate_messages_received_total",
        &[],
        load(&stats.received),
    );
    o.family(
        "cpsgate_messages_forwarded_total",
        "counter",
        "Requests and responses relayed.",
    );
    o.sample(
        "cpsgate_messages_forwarded_total",
        &[],
        load(&stats.forwarded),
    );
    o.family(
        "cpsgate_responses_relayed_total",
        "counter",
        "Responses relayed, by class.",
    );
    for (i, c) in CLASSES.iter().enumerate().skip(1) {
        o.sample(
            "cpsgate_responses_relayed_total",
            &[("class", c)],
            load(&stats.responses[i]),
        );
    }
    o.family("cpsgate_local_replies_total", "counter", "Answers the gate generated itself (400, 403, 483, CANCEL 200, ...), by class; CPS refusals are cpsgate_invites_total.");
    for (i, c) in CLASSES.iter().enumerate().skip(1) {
        o.sample(
            "cpsgate_local_replies_total",
            &[("class", c)],
            stats.replies(i),
        );
    }
    o.family(
        "cpsgate_drops_total",
        "counter",
        "Messages dropped without an answer, by reason.",
    );
    for r in DropReason::ALL {
        o.sample(
            "cpsgate_drops_total",
            &[("reason", r.as_str())],
            stats.drops(r),
        );
    }
    for r in TransportDrop::ALL {
        o.sample(
            "cpsgate_drops_total",
            &[("reason", r.as_str())],
            stats.transport_drops(r),
        );
    }
    o.family(
        "cpsgate_acks_absorbed_total",
        "counter",
        "ACKs of the gate's own final answers, absorbed.",
    );
    o.sample("cpsgate_acks_absorbed_total", &[], load(&stats.absorbed));
    o.family(
        "cpsgate_cancels_answered_total",
        "counter",
        "CANCELs of refused INVITEs answered 200 here, never forwarded.",
    );
    o.sample(
        "cpsgate_cancels_answered_total",
        &[],
        proxy.cancels_answered(),
    );
    o.family(
        "cpsgate_retransmissions_absorbed_total",
        "counter",
        "Retransmitted refused INVITEs answered from the decision cache, uncharged.",
    );
    o.sample(
        "cpsgate_retransmissions_absorbed_total",
        &[],
        load(&stats.retransmissions),
    );
    o.family(
        "cpsgate_refusals_by_stage_total",
        "counter",
        "Calls refused by a CPS limit, by stage (all trunks and sources).",
    );
    for s in Stage::ALL {
        o.sample(
            "cpsgate_refusals_by_stage_total",
            &[("stage", s.as_str())],
            stats.rejected(s),
        );
    }

    let snap = proxy.snapshot(now);
    o.family(
        "cpsgate_invites_total",
        "counter",
        "Initial INVITEs of each trunk, by outcome (forwarded, or rejected at a stage).",
    );
    for t in &snap.trunks {
        let account = t.account.as_deref().unwrap_or("");
        let base = [("trunk", t.limits.name.as_str()), ("account", account)];
        o.sample(
            "cpsgate_invites_total",
            &[base[0], base[1], ("outcome", "forwarded")],
            t.limits.admitted,
        );
        for (stage, n) in &t.limits.rejected {
            o.sample(
                "cpsgate_invites_total",
                &[base[0], base[1], ("outcome", "rejected"), ("stage", stage)],
                n,
            );
        }
    }
    for t in &snap.trunks {
        let account = t.account.as_deref().unwrap_or("");
        if t.limits.queued > 0 {
            o.sample(
                "cpsgate_invites_total",
                &[
                    ("trunk", &t.limits.name),
                    ("account", account),
                    ("outcome", "queued"),
                ],
                t.limits.queued,
            );
        }
    }
    o.family(
        "cpsgate_account_invites_total",
        "counter",
        "Initial INVITEs of each account's trunks, by outcome.",
    );
    for a in &snap.accounts {
        o.sample(
            "cpsgate_account_invites_total",
            &[("account", &a.name), ("outcome", "forwarded")],
            a.admitted,
        );
        for (stage, n) in &a.rejected {
            o.sample(
                "cpsgate_account_invites_total",
                &[
                    ("account", &a.name),
                    ("outcome", "rejected"),
                    ("stage", stage),
                ],
                n,
            );
        }
    }
    o.family(
        "cpsgate_trunk_cps",
        "gauge",
        "Calls a trunk admitted in the last whole second.",
    );
    for t in &snap.trunks {
        o.sample(
            "cpsgate_trunk_cps",
            &[("trunk", &t.limits.name)],
            t.limits.cps,
        );
    }
    o.family(
        "cpsgate_account_cps",
        "gauge",
        "Calls an account admitted in the last whole second.",
    );
    for a in &snap.accounts {
        o.sample("cpsgate_account_cps", &[("account", &a.name)], a.cps);
    }
    let keys: Vec<(&str, &crate::proxy::KeyView)> = snap
        .trunks
        .iter()
        .map(|t| ("trunk", &t.limits))
        .chain(snap.accounts.iter().map(|a| ("account", a)))
        .collect();
    // Each family's samples stay together, as the exposition format requires.
    type Get = fn(&crate::proxy::KeyView) -> Option<f64>;
    let per_key: [(&str, &str, &str, Get); 9] = [
        (
            "cpsgate_limit_rate",
            "gauge",
            "Configured (or runtime-set) rate, calls per second.",
            |k| Some(k.rate),
        ),
        (
            "cpsgate_limit_burst",
            "gauge",
            "Configured (or runtime-set) burst, calls.",
            |k| Some(f64::from(k.burst)),
        ),
        (
            "cpsgate_peak_cps",
            "gauge",
            "Most calls admitted in one second of the usage period.",
            |k| Some(f64::from(k.usage.peak_cps)),
        ),
        (
            "cpsgate_p95_cps",
            "gauge",
            "95th percentile of per-second admissions over the usage period (Telnyx's surcharge measure).",
            |k| Some(f64::from(k.usage.p95_cps)),
        ),
        (
            "cpsgate_calls_answered_total",
            "counter",
            "Admitted calls answered.",
            |k| Some(k.usage.answered as f64),
        ),
        (
            "cpsgate_calls_failed_total",
            "counter",
            "Admitted calls that ended unanswered (or reached Timer C).",
            |k| Some(k.usage.failed as f64),
        ),
        (
            "cpsgate_asr",
            "gauge",
            "Answered / attempted admitted calls.",
            |k| k.usage.asr,
        ),
        (
            "cpsgate_acd_seconds",
            "gauge",
            "Mean answer-to-BYE duration of completed calls.",
            |k| k.usage.acd_secs,
        ),
        (
            "cpsgate_short_call_share",
            "gauge",
            "Share of completed calls of 12 s or less.",
            |k| k.usage.short_call_share,
        ),
    ];
    for (family, kind, help, get) in per_key {
        o.family(family, kind, help);
        for (label_kind, k) in &keys {
            if let Some(v) = get(k) {
                o.sample(family, &[("kind", label_kind), ("name", &k.name)], v);
            }
        }
    }
    let mut tables = vec![
        ("sources", snap.tables.sources),
        ("decisions", snap.tables.decisions),
        ("dialogs", snap.tables.dialogs),
    ];
    if let Some(u) = snap.tables.usernames {
        tables.push(("usernames", u));
    }
    let table_families = [
        (
            "cpsgate_table_entries",
            "gauge",
            "Entries in a bounded table.",
        ),
        (
            "cpsgate_table_capacity",
            "gauge",
            "Hard cap of a bounded table.",
        ),
        (
            "cpsgate_table_evictions_total",
            "counter",
            "Entries forgotten (refilled, expired, or over the cap).",
        ),
    ];
    for (i, (family, kind, help)) in table_families.iter().enumerate() {
        o.family(family, kind, help);
        for (name, (len, cap, evicted)) in &tables {
            let v = [*len as u64, *cap as u64, *evicted][i];
            o.sample(family, &[("table", name)], v);
        }
    }
    o.family(
        "cpsgate_queue_depth",
        "gauge",
        "Paced calls waiting for their slot.",
    );
    for t in &snap.trunks {
        o.sample(
            "cpsgate_queue_depth",
            &[("trunk", &t.limits.name)],
            t.limits.waiting,
        );
    }
    o.family(
        "cpsgate_queue_delay_seconds",
        "histogram",
        "How long paced calls waited for their slot.",
    );
    for t in &snap.trunks {
        let mut cumulative = 0;
        for (i, n) in t.limits.queue_delays.iter().enumerate() {
            cumulative += n;
            let le = crate::limiter::QUEUE_DELAY_BOUNDS_MS
                .get(i)
                .map_or("+Inf".to_owned(), |b| format!("{}", *b as f64 / 1e3));
            o.sample(
                "cpsgate_queue_delay_seconds_bucket",
                &[("trunk", &t.limits.name), ("le", &le)],
                cumulative,
            );
        }
        o.sample(
            "cpsgate_queue_delay_seconds_count",
            &[("trunk", &t.limits.name)],
            cumulative,
        );
    }
    histogram(
        &mut o,
        "cpsgate_decision_seconds",
        "Time the decision core took per message.",
        &stats.latency,
    );
    histogram(
        &mut o,
        "cpsgate_udp_transit_seconds",
        "Time from a UDP datagram's arrival at the gate's socket (kernel receive timestamp) to \
         its forward or answer leaving the gate, for datagrams relayed or answered at once.",
        &stats.transit.0,
    );
    o.family(
        "cpsgate_config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
    );
    o.sample(
        "cpsgate_config_reloads_total",
        &[("result", "applied")],
        load(&stats.reloads),
    );
    o.sample(
        "cpsgate_config_reloads_total",
        &[("result", "refused")],
        load(&stats.reload_failures),
    );
    o.family(
        "cpsgate_flood_blocks_total",
        "counter",
        "Sources the flood guard blocked ([flood]); their packets count as drops, reason flood.",
    );
    o.sample("cpsgate_flood_blocks_total", &[], load(&stats.flood_blocks));
    o.family(
        "cpsgate_tcp_connections_total",
        "counter",
        "TCP connections opened, both directions.",
    );
    o.sample(
        "cpsgate_tcp_connections_total",
        &[],
        load(&stats.connections),
    );
    o.family(
        "cpsgate_draining",
        "gauge",
        "1 once a shutdown has started.",
    );
    o.sample("cpsgate_draining", &[], u8::from(snap.draining));
    o.0
}

/// The alert webhook's counters.
pub fn render_alerts(out: &mut String, a: &crate::alerts::Alerts) {
    let mut o = Out(std::mem::take(out));
    o.family(
        "cpsgate_alerts_total",
        "counter",
        "Alert events, by result (delivered, failed after retries, dropped from a full queue).",
    );
    for (result, n) in [
        ("delivered", &a.delivered),
        ("failed", &a.failed),
        ("dropped", &a.dropped),
    ] {
        o.sample(
            "cpsgate_alerts_total",
            &[("result", result)],
            n.load(Ordering::Relaxed),
        );
    }
    *out = o.0;
}

/// The cluster client's counters.
pub fn render_cluster(out: &mut String, c: &crate::cluster::Cluster) {
    use crate::cluster::{Failure, Fallback, ROUNDTRIP_BOUNDS_US};
    let st = &c.stats;
    let mut o = Out(std::mem::take(out));
    o.family(
        "cpsgate_cluster_decisions_total",
        "counter",
        "Shared-bucket decisions Redis made, by result.",
    );
    for (result, n) in [("admitted", &st.admitted), ("refused", &st.refused)] {
        o.sample(
            "cpsgate_cluster_decisions_total",
            &[("result", result)],
            n.load(Ordering::Relaxed),
        );
    }
    o.family(
        "cpsgate_cluster_failures_total",
        "counter",
        "Shared-bucket decisions Redis did not make, by reason (timeout, error, down: not asked after a failure, busy: too many under way).",
    );
    for f in Failure::ALL {
        o.sample(
            "cpsgate_cluster_failures_total",
            &[("reason", f.as_str())],
            st.failures(f),
        );
    }
    o.family(
        "cpsgate_cluster_fallback_total",
        "counter",
        "Calls the failure policy decided while Redis did not answer, by policy and outcome.",
    );
    for f in Fallback::ALL {
        let (policy, outcome) = f.labels();
        o.sample(
            "cpsgate_cluster_fallback_total",
            &[("policy", policy), ("outcome", outcome)],
            st.fallbacks(f),
        );
    }
    o.family(
        "cpsgate_cluster_refunds_total",
        "counter",
        "Shared cells given back because a later local stage refused the call, by result.",
    );
    for (result, n) in [("delivered", &st.refunds), ("failed", &st.refund_failures)] {
        o.sample(
            "cpsgate_cluster_refunds_total",
            &[("result", result)],
            n.load(Ordering::Relaxed),
        );
    }
    o.family(
        "cpsgate_cluster_up",
        "gauge",
        "1 while Redis answers; 0 while the failure policy decides.",
    );
    o.sample(
        "cpsgate_cluster_up",
        &[],
        u8::from(st.up.load(Ordering::Relaxed)),
    );
    o.family(
        "cpsgate_cluster_recoveries_total",
        "counter",
        "Times the shared mode resumed after Redis came back.",
    );
    o.sample(
        "cpsgate_cluster_recoveries_total",
        &[],
        st.recoveries.load(Ordering::Relaxed),
    );
    o.family(
        "cpsgate_cluster_roundtrip_seconds",
        "histogram",
        "Time of one Redis decision (script round trip).",
    );
    let (buckets, sum_us) = st.roundtrips();
    let mut cumulative = 0;
    for (i, n) in buckets.iter().enumerate() {
        cumulative += n;
        let le = ROUNDTRIP_BOUNDS_US
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |b| format!("{}", *b as f64 / 1e6));
        o.sample(
            "cpsgate_cluster_roundtrip_seconds_bucket",
            &[("le", &le)],
            cumulative,
        );
    }
    o.sample(
        "cpsgate_cluster_roundtrip_seconds_sum",
        &[],
        format!("{}", sum_us as f64 / 1e6),
    );
    o.sample("cpsgate_cluster_roundtrip_seconds_count", &[], cumulative);
    *out = o.0;
}
