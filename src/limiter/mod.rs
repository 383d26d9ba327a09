//! CPS limiting: GCRA buckets ([`gcra`]), bounded keyed tables ([`table`]) and the all-or-none
//! admission chain. Nothing here reads a clock or knows SIP; callers pass `now` and keys.
//!
//! The chain, for one initial INVITE: the trunk's bucket (or, for traffic on no trunk, the
//! per-source bucket) → the optional per-username bucket → the account pool → the optional
//! global bucket. A stage that admitted is refunded when a later one refuses, so a refused call
//! consumes nothing anywhere.

pub mod gcra;
pub mod table;
pub mod usage;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use gcra::{Epoch, Gcra, Limit, Params};
pub use table::{BoundedMap, Expiring, KeyedBuckets};
pub use usage::{KeyStats, QUEUE_DELAY_BOUNDS_MS, Usage};

/// A stage of the admission chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The trunk's own limit.
    Trunk,
    /// The per-source-IP limit of traffic on no trunk.
    Source,
    /// The per-SIP-username limit.
    Username,
    /// The parent account's pool.
    Account,
    /// The global protection limit.
    Global,
}

impl Stage {
    /// Every stage, in chain order.
    pub const ALL: [Stage; 5] = [
        Stage::Trunk,
        Stage::Source,
        Stage::Username,
        Stage::Account,
        Stage::Global,
    ];

    /// Stable label for logs, metrics and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Trunk => "trunk",
            Stage::Source => "source",
            Stage::Username => "username",
            Stage::Account => "account",
            Stage::Global => "global",
        }
    }

    /// Position in [`Stage::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A set of stages (to run part of the chain: the local stages of a call whose other stages are
/// shared through Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stages(u8);

impl Stages {
    /// Every stage.
    pub const ALL: Stages = Stages(0b1_1111);
    /// No stage.
    pub const NONE: Stages = Stages(0);

    /// Just `stage`.
    pub fn of(stage: Stage) -> Self {
        Stages(1 << stage.index())
    }

    /// This set and `stage`.
    pub fn with(self, stage: Stage) -> Self {
        Stages(self.0 | 1 << stage.index())
    }

    /// This set without `stage`.
    pub fn without(self, stage: Stage) -> Self {
        Stages(self.0 & !(1 << stage.index()))
    }

    /// True when `stage` is in the set.
    pub fn has(self, stage: Stage) -> bool {
        self.0 & 1 << stage.index() != 0
    }

    /// True when the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The first stage of a call: its trunk, or its source when it is on no trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// Trunk index.
    Trunk(usize),
    /// Keyed hash of the source IP.
    Source(u64),
}

/// What one call must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// Stage 1.
    pub first: First,
    /// Keyed hash of the SIP username, when the call has one.
    pub username: Option<u64>,
    /// Account index, when the trunk has a parent account.
    pub account: Option<usize>,
}

/// A refusal: which stage, and when a cell would conform there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The stage that refused.
    pub stage: Stage,
    /// Time until that stage would admit.
    pub retry_after: Duration,
}

/// A pacing reservation: the wait until its slot, and the TAT each stage was left at (to give
/// the cells back with [`Chain::release`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Time until the slot (zero: now).
    pub wait: Duration,
    /// Each stage taken, with the TAT its cell found and the one it left.
    pub taken: Vec<(Stage, (u64, u64))>,
}

/// Limits of one configuration, by name (names carry bucket state across reloads).
#[derive(Debug, Clone, PartialEq)]
pub struct ChainSpec {
    /// Trunks in config order.
    pub trunks: Vec<(String, Limit)>,
    /// Accounts in config order.
    pub accounts: Vec<(String, Limit)>,
    /// Per-source limit for traffic on no trunk.
    pub source: Limit,
    /// Per-username limit, if any.
    pub username: Option<Limit>,
    /// Global limit, if any.
    pub global: Option<Limit>,
    /// Cap of the per-source and per-username tables each.
    pub table_cap: usize,
    /// Seconds of per-second admission history each trunk and account keeps.
    pub usage_period: u64,
}

/// A named bucket with its counters.
#[derive(Debug)]
pub struct Keyed {
    /// The name (trunk or account).
    pub name: String,
    /// Its bucket.
    pub bucket: Arc<Gcra>,
    /// Its counters.
    pub stats: Arc<KeyStats>,
}

/// The buckets of one configuration. Trunk and account buckets are shared (`Arc`) with the chain
/// a reload builds, so their state survives it.
pub struct Chain {
    epoch: Epoch,
    trunks: Vec<Keyed>,
    accounts: Vec<Keyed>,
    sources: Arc<KeyedBuckets>,
    usernames: Option<Arc<KeyedBuckets>>,
    global: Option<Arc<Gcra>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("trunks", &self.trunks.len())
            .field("accounts", &self.accounts.len())
            .field("sources", &self.sources.table().len())
            .finish()
    }
}

impl Chain {
    /// Fresh (full) buckets for `spec`.
    pub fn new(spec: &ChainSpec, epoch: Epoch) -> Self {
        let fresh = |list: &[(String, Limit)]| {
            list.iter()
                .map(|(n, l)| Keyed {
                    name: n.clone(),
                    bucket: Arc::new(Gcra::new(*l, epoch)),
                    stats: Arc::new(KeyStats::new(spec.usage_period)),
                })
                .collect()
        };
        Self {
            epoch,
            trunks: fresh(&spec.trunks),
            accounts: fresh(&spec.accounts),
            sources: Arc::new(KeyedBuckets::new(spec.source, spec.table_cap)),
            usernames: spec
                .username
                .map(|l| Arc::new(KeyedBuckets::new(l, spec.table_cap))),
            global: spec.global.map(|l| Arc::new(Gcra::new(l, epoch))),
        }
    }

    /// The chain for a new configuration: buckets whose name remains keep their state and get
    /// the new limit in place (the cells used stay used); new names start full; removed ones go.
    pub fn reload(&self, spec: &ChainSpec, now: Instant) -> Self {
        let carry = |old: &[Keyed], new: &[(String, Limit)]| {
            new.iter()
                .map(|(n, l)| match old.iter().find(|o| &o.name == n) {
                    Some(o) => {
                        o.bucket.rescale(now, *l);
                        Keyed {
                            name: n.clone(),
                            bucket: o.bucket.clone(),
                            stats: o.stats.clone(),
                        }
                    }
                    None => Keyed {
                        name: n.clone(),
                        bucket: Arc::new(Gcra::new(*l, self.epoch)),
                        stats: Arc::new(KeyStats::new(spec.usage_period)),
                    },
                })
                .collect()
        };
        self.sources.set_limit(spec.source);
        let usernames = match (&self.usernames, spec.username) {
            (Some(t), Some(l)) => {
                t.set_limit(l);
                Some(t.clone())
            }
            (None, Some(l)) => Some(Arc::new(KeyedBuckets::new(l, spec.table_cap))),
            (_, None) => None,
        };
        let global = match (&self.global, spec.global) {
            (Some(b), Some(l)) => {
                b.rescale(now, l);
                Some(b.clone())
            }
            (None, Some(l)) => Some(Arc::new(Gcra::new(l, self.epoch))),
            (_, None) => None,
        };
        Self {
            epoch: self.epoch,
            trunks: carry(&self.trunks, &spec.trunks),
            accounts: carry(&self.accounts, &spec.accounts),
            sources: self.sources.clone(),
            usernames,
            global,
        }
    }

    /// The time base.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Run one call through every stage, all or none.
    pub fn admit(&self, now: Instant, ask: &Ask) -> Result<(), Refused> {
        self.admit_stages(now, ask, Stages::ALL)
    }

    /// Run one call through the stages in `only`, in chain order, all or none: a stage that
    /// admitted is refunded when a later one refuses.
    pub fn admit_stages(&self, now: Instant, ask: &Ask, only: Stages) -> Result<(), Refused> {
        let ns = self.epoch.ns(now);
        let mut taken = Stages::NONE;
        for stage in Stage::ALL {
            if !only.has(stage) {
                continue;
            }
            let got = match stage {
                Stage::Trunk => match ask.first {
                    First::Trunk(t) => Some(self.trunks[t].bucket.try_acquire(now)),
                    First::Source(_) => None,
                },
                Stage::Source => match ask.first {
                    First::Source(k) => Some(self.sources.try_acquire(k, ns)),
                    First::Trunk(_) => None,
                },
                Stage::Username => ask
                    .username
                    .zip(self.usernames.as_ref())
                    .map(|(k, table)| table.try_acquire(k, ns)),
                Stage::Account => ask
                    .account
                    .map(|a| self.accounts[a].bucket.try_acquire(now)),
                Stage::Global => self.global.as_ref().map(|g| g.try_acquire(now)),
            };
            match got {
                None => {}
                Some(Ok(())) => taken = taken.with(stage),
                Some(Err(retry_after)) => {
                    self.refund_stages(ask, taken);
                    return Err(Refused { stage, retry_after });
                }
            }
        }
        Ok(())
    }

    /// Give back the cell each stage in `only` took for `ask` with [`Chain::admit_stages`].
    pub fn refund_stages(&self, ask: &Ask, only: Stages) {
        if only.has(Stage::Trunk)
            && let First::Trunk(t) = ask.first
        {
            self.trunks[t].bucket.refund();
        }
        if only.has(Stage::Source)
            && let First::Source(k) = ask.first
        {
            self.sources.refund(k);
        }
        if only.has(Stage::Username)
            && let Some((k, table)) = ask.username.zip(self.usernames.as_ref())
        {
            table.refund(k);
        }
        if only.has(Stage::Account)
            && let Some(a) = ask.account
        {
            self.accounts[a].bucket.refund();
        }
        if only.has(Stage::Global)
            && let Some(g) = &self.global
        {
            g.refund();
        }
    }

    /// The decision for one call: admit it now (`Ok(None)`), book it a slot ahead when its first
    /// stage paces (`pacing = (max_delay, max_queue)`; `Ok(Some)`, the caller queues it), or
    /// refuse it. A trunk whose queue already holds `max_queue` calls refuses at the trunk stage.
    #[inline]
    pub fn decide(
        &self,
        now: Instant,
        ask: &Ask,
        pacing: Option<(Duration, usize)>,
    ) -> Result<Option<Reservation>, Refused> {
        let Some((max_delay, max_queue)) = pacing else {
            return self.admit(now, ask).map(|()| None);
        };
        let booked = self.reserve(now, ask, max_delay)?;
        if booked.wait.is_zero() {
            return Ok(None);
        }
        let full = matches!(ask.first, First::Trunk(t)
            if self.trunks[t].stats.waiting() >= max_queue as u64);
        if full {
            self.release(ask, &booked.taken);
            return Err(Refused {
                stage: Stage::Trunk,
                retry_after: booked.wait,
            });
        }
        Ok(Some(booked))
    }

    /// Reserve, for a call that may wait up to `max_wait`, the earliest instant at which every
    /// stage admits it, and take a cell at that instant in each (all or none). Returns the wait;
    /// a refusal names the stage whose slot lies too far ahead.
    pub fn reserve(
        &self,
        now: Instant,
        ask: &Ask,
        max_wait: Duration,
    ) -> Result<Reservation, Refused> {
        let ns = self.epoch.ns(now);
        let max = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX);
        let user = ask.username.zip(self.usernames.as_ref());
        let account = ask.account.map(|a| &self.accounts[a].bucket);
        // A few rounds: another call may take a slot between the look and the take.
        for _ in 0..8 {
            let mut stages: Vec<(Stage, u64)> = vec![match ask.first {
                First::Trunk(t) => (Stage::Trunk, self.trunks[t].bucket.earliest(now)),
                First::Source(k) => (Stage::Source, self.sources.earliest(k, ns)),
            }];
            if let Some((k, table)) = user {
                stages.push((Stage::Username, table.earliest(k, ns)));
            }
            if let Some(pool) = account {
                stages.push((Stage::Account, pool.earliest(now)));
            }
            if let Some(g) = &self.global {
                stages.push((Stage::Global, g.earliest(now)));
            }
            let (stage, at) = stages
                .iter()
                .copied()
                .max_by_key(|(_, t)| *t)
                .expect("at least the first stage");
            if at - ns > max {
                return Err(Refused {
                    stage,
                    retry_after: Duration::from_nanos(at - ns - max),
                });
            }
            // Take every stage at the same instant; undo on a lost race and look again.
            let mut taken: Vec<(Stage, (u64, u64))> = Vec::with_capacity(stages.len());
            let ok = stages.iter().all(|(s, _)| {
                let got = match s {
                    Stage::Trunk => match ask.first {
                        First::Trunk(t) => self.trunks[t].bucket.take_at(at),
                        First::Source(_) => None,
                    },
                    Stage::Source => match ask.first {
                        First::Source(k) => self.sources.take_at(k, ns, at),
                        First::Trunk(_) => None,
                    },
                    Stage::Username => user.and_then(|(k, table)| table.take_at(k, ns, at)),
                    Stage::Account => account.and_then(|p| p.take_at(at)),
                    Stage::Global => self.global.as_ref().and_then(|g| g.take_at(at)),
                };
                if let Some(left) = got {
                    taken.push((*s, left));
                }
                got.is_some()
            });
            if ok {
                return Ok(Reservation {
                    wait: Duration::from_nanos(at - ns),
                    taken,
                });
            }
            self.release(ask, &taken);
        }
        Err(Refused {
            stage: Stage::Trunk,
            retry_after: Duration::from_millis(1),
        })
    }

    /// Give back the cells of a reservation (cancelled, refused at shutdown, or a lost race),
    /// each only if no later cell was taken in its bucket (see [`gcra::release`]).
    pub fn release(&self, ask: &Ask, taken: &[(Stage, (u64, u64))]) {
        for &(s, left) in taken {
            match (s, ask.first) {
                (Stage::Trunk, First::Trunk(t)) => {
                    self.trunks[t].bucket.release(left);
                }
                (Stage::Source, First::Source(k)) => {
                    self.sources.release(k, left);
                }
                (Stage::Username, _) => {
                    if let (Some(k), Some(t)) = (ask.username, &self.usernames) {
                        t.release(k, left);
                    }
                }
                (Stage::Account, _) => {
                    if let Some(a) = ask.account {
                        self.accounts[a].bucket.release(left);
                    }
                }
                (Stage::Global, _) => {
                    if let Some(g) = &self.global {
                        g.release(left);
                    }
                }
                _ => {}
            }
        }
    }

    /// A trunk's bucket.
    pub fn trunk(&self, t: usize) -> &Gcra {
        &self.trunks[t].bucket
    }

    /// An account's bucket.
    pub fn account(&self, a: usize) -> &Gcra {
        &self.accounts[a].bucket
    }

    /// Every trunk with its bucket and counters, in config order.
    pub fn trunks(&self) -> &[Keyed] {
        &self.trunks
    }

    /// Every account with its bucket and counters, in config order.
    pub fn accounts(&self) -> &[Keyed] {
        &self.accounts
    }

    /// The global bucket, if configured.
    pub fn global(&self) -> Option<&Gcra> {
        self.global.as_deref()
    }

    /// The per-source table.
    pub fn sources(&self) -> &KeyedBuckets {
        &self.sources
    }

    /// The per-username table, if configured.
    pub fn usernames(&self) -> Option<&KeyedBuckets> {
        self.usernames.as_deref()
    }
}

#[cfg(test)]
mod tests;
