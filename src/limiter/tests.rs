//! Chain tests with a hand-set clock.

use std::time::{Duration, Instant};

use super::*;

fn spec(trunks: &[(&str, f64, u32)], pool: Option<(f64, u32)>) -> ChainSpec {
    ChainSpec {
        trunks: trunks
            .iter()
            .map(|(n, r, b)| {
                (
                    n.to_string(),
                    Limit {
                        rate: *r,
                        burst: *b,
                    },
                )
            })
            .collect(),
        accounts: pool
            .map(|(r, b)| ("acct".to_owned(), Limit { rate: r, burst: b }))
            .into_iter()
            .collect(),
        source: Limit {
            rate: 20.0,
            burst: 1,
        },
        username: None,
        global: None,
        table_cap: 1000,
        usage_period: 60,
    }
}

fn ask(t: usize, account: bool) -> Ask {
    Ask {
        first: First::Trunk(t),
        username: None,
        account: account.then_some(0),
    }
}

/// Offer `per_sec` calls per second on each planned trunk over `secs` seconds from `t0` (each
/// trunk's arrivals evenly spaced, trunk `i` offset by `i * 3` ms so they do not coincide);
/// count the admitted ones per trunk and second.
fn offer(
    chain: &Chain,
    t0: Instant,
    plan: &[(usize, u32)],
    secs: u32,
    pooled: bool,
) -> Vec<Vec<u32>> {
    let mut per_trunk = vec![vec![0u32; secs as usize]; plan.len()];
    for ms in 0..secs * 1000 {
        for (i, (t, per_sec)) in plan.iter().enumerate() {
            let step = 1000 / per_sec;
            let local = (ms + 1000 - (i as u32 * 3) % step) % 1000;
            if local.is_multiple_of(step) && local / step < *per_sec {
                let now = t0 + Duration::from_millis(u64::from(ms));
                if chain.admit(now, &ask(*t, pooled)).is_ok() {
                    per_trunk[i][(ms / 1000) as usize] += 1;
                }
            }
        }
    }
    per_trunk
}

#[test]
fn an_abusive_trunk_cannot_burn_the_pool_a_compliant_one_needs() {
    let t0 = Instant::now();
    let chain = Chain::new(
        &spec(
            &[("abusive", 50.0, 5), ("compliant", 50.0, 5)],
            Some((80.0, 5)),
        ),
        Epoch::new(t0),
    );
    let got = offer(&chain, t0, &[(0, 500), (1, 25)], 10, true);
    // The compliant trunk offers 25/s, within the 30/s the pool has left after the abusive
    // trunk's own 50: every call passes, every second.
    // (In the very first second the abusive trunk's burst may take one of its calls.)
    assert!(got[1][0] >= 24, "compliant: {:?}", got[1]);
    assert!(
        got[1].iter().skip(1).all(|&n| n == 25),
        "compliant: {:?}",
        got[1]
    );
    // The abusive trunk gets its trunk rate, never more.
    assert!(got[0][0] <= 50 + 5, "abusive: {:?}", got[0]);
    assert!(
        got[0].iter().skip(1).all(|&n| (49..=50).contains(&n)),
        "abusive: {:?}",
        got[0]
    );
}

#[test]
fn over_provisioned_trunks_share_the_pool_and_the_pool_holds() {
    let t0 = Instant::now();
    let chain = Chain::new(
        &spec(&[("a", 50.0, 5), ("b", 50.0, 5)], Some((80.0, 5))),
        Epoch::new(t0),
    );
    let got = offer(&chain, t0, &[(0, 100), (1, 100)], 20, true);
    for (s, (a, b)) in got[0].iter().zip(&got[1]).enumerate() {
        // The burst may show in the first second only.
        let extra = if s == 0 { 5 } else { 1 };
        assert!(
            a + b <= 80 + extra,
            "second {s}: {} through an 80 CPS pool",
            a + b
        );
        assert!(*a <= 50 + extra && *b <= 50 + extra);
    }
    let total: u32 = got.iter().flatten().sum();
    // Long-run rate within 1 % of the pool.
    assert!((total as f64 - 80.0 * 20.0).abs() <= 16.0, "{total}");
}

#[test]
fn first_second_is_exact() {
    let t0 = Instant::now();
    let chain = Chain::new(&spec(&[("t", 20.0, 1)], None), Epoch::new(t0));
    let got = offer(&chain, t0, &[(0, 1000)], 1, false);
    assert_eq!(got[0][0], 20, "a reset counter would let up to 40 through");
}

#[test]
fn a_later_stage_refusing_refunds_the_earlier_ones() {
    let t0 = Instant::now();
    let chain = Chain::new(&spec(&[("t", 1.0, 2)], Some((1.0, 1))), Epoch::new(t0));
    assert!(chain.admit(t0, &ask(0, true)).is_ok());
    // The pool is empty: refused at the account stage, and the trunk cell is given back.
    let r = chain.admit(t0, &ask(0, true)).expect_err("pool empty");
    assert_eq!(r.stage, Stage::Account);
    assert_eq!(r.retry_after, Duration::from_secs(1));
    assert_eq!(chain.trunk(0).available(t0), 1, "trunk refunded");
    // Without the pool the trunk's remaining cell is there.
    assert!(chain.admit(t0, &ask(0, false)).is_ok());
}

#[test]
fn usernames_and_the_global_bucket_are_stages_too() {
    let t0 = Instant::now();
    let mut s = spec(&[("t", 100.0, 100)], Some((100.0, 100)));
    s.username = Some(Limit {
        rate: 1.0,
        burst: 1,
    });
    s.global = Some(Limit {
        rate: 1.0,
        burst: 2,
    });
    let chain = Chain::new(&s, Epoch::new(t0));
    let with_user = |u| Ask {
        first: First::Trunk(0),
        username: Some(u),
        account: Some(0),
    };
    assert!(chain.admit(t0, &with_user(7)).is_ok());
    assert_eq!(
        chain.admit(t0, &with_user(7)).map_err(|r| r.stage),
        Err(Stage::Username)
    );
    assert!(chain.admit(t0, &with_user(8)).is_ok());
    assert_eq!(
        chain.admit(t0, &with_user(9)).map_err(|r| r.stage),
        Err(Stage::Global)
    );
    // Refused calls consumed nothing: 2 admitted of 100 on trunk and pool.
    assert_eq!(chain.trunk(0).available(t0), 98);
    assert_eq!(chain.account(0).available(t0), 98);
}

#[test]
fn sources_have_a_bucket_each() {
    let t0 = Instant::now();
    let chain = Chain::new(&spec(&[], None), Epoch::new(t0));
    let src = |k| Ask {
        first: First::Source(k),
        username: None,
        account: None,
    };
    assert!(chain.admit(t0, &src(1)).is_ok());
    assert_eq!(
        chain.admit(t0, &src(1)).map_err(|r| r.stage),
        Err(Stage::Source)
    );
    assert!(chain.admit(t0, &src(2)).is_ok());
}

#[test]
fn reload_keeps_used_cells_and_starts_new_trunks_full() {
    let t0 = Instant::now();
    let chain = Chain::new(&spec(&[("a", 10.0, 10)], None), Epoch::new(t0));
    for _ in 0..10 {
        assert!(chain.admit(t0, &ask(0, false)).is_ok());
    }
    let next = chain.reload(&spec(&[("new", 5.0, 5), ("a", 20.0, 20)], None), t0);
    // "a" is now index 1: its 10 used cells stay used; 10 of the new 20 remain, no fresh burst.
    assert_eq!(next.trunk(1).available(t0), 10);
    assert_eq!(next.trunk(0).available(t0), 5);
}

#[test]
fn a_reservation_takes_the_same_instant_in_every_stage() {
    let t0 = Instant::now();
    // Trunk 10/s burst 1, pool 5/s burst 1: the pool binds.
    let chain = Chain::new(&spec(&[("t", 10.0, 1)], Some((5.0, 1))), Epoch::new(t0));
    let wait = |n: u32| {
        (0..n)
            .map(|_| {
                chain
                    .reserve(t0, &ask(0, true), Duration::from_secs(1))
                    .map(|r| r.wait.as_millis())
            })
            .collect::<Vec<_>>()
    };
    // Slots at 0, 200, 400, ... ms (the pool's spacing), never closer than the trunk allows.
    assert_eq!(wait(5), [Ok(0), Ok(200), Ok(400), Ok(600), Ok(800)]);
    // The sixth would wait 1 s: refused at the binding stage.
    let r = chain
        .reserve(t0, &ask(0, true), Duration::from_millis(999))
        .expect_err("too far");
    assert_eq!(r.stage, Stage::Account);
}

#[test]
fn releasing_the_last_reservation_frees_its_slot_an_earlier_one_does_not() {
    let t0 = Instant::now();
    let chain = Chain::new(&spec(&[("t", 10.0, 1)], Some((10.0, 1))), Epoch::new(t0));
    let a = ask(0, true);
    let book = || {
        chain
            .reserve(t0, &a, Duration::from_secs(1))
            .expect("booked")
    };
    assert_eq!(book().wait, Duration::ZERO);
    let second = book();
    assert_eq!(second.wait, Duration::from_millis(100));
    // The last booking given back: the next call takes its slot.
    chain.release(&a, &second.taken);
    let again = book();
    assert_eq!(again.wait, Duration::from_millis(100));
    // With a later booking behind it (200 ms), a cancelled one (100 ms) is not given back: a
    // plain refund would book the next call at 200 ms beside the one already there — two
    // calls at once on a 10 CPS, burst 1 trunk. Its slot is skipped instead.
    let third = book();
    assert_eq!(third.wait, Duration::from_millis(200));
    chain.release(&a, &again.taken);
    assert_eq!(
        book().wait,
        Duration::from_millis(300),
        "no call squeezed into the gap"
    );
}

#[test]
fn part_of_the_chain_runs_all_or_none_and_gives_back_only_its_own_cells() {
    let t0 = Instant::now();
    let chain = Chain::new(&spec(&[("t", 10.0, 2)], Some((10.0, 1))), Epoch::new(t0));
    let a = ask(0, true);
    // Only the trunk (the pool kept elsewhere): the pool is never touched.
    let trunk_only = Stages::of(Stage::Trunk);
    assert!(chain.admit_stages(t0, &a, trunk_only).is_ok());
    assert!(chain.admit_stages(t0, &a, trunk_only).is_ok());
    assert_eq!(chain.account(0).available(t0), 1);
    assert_eq!(
        chain.admit_stages(t0, &a, trunk_only).map_err(|r| r.stage),
        Err(Stage::Trunk)
    );
    chain.refund_stages(&a, trunk_only);
    assert_eq!(chain.trunk(0).available(t0), 1);
    // The pool alone, then the whole chain: the pool is empty, so the trunk cell the whole
    // chain took first goes back.
    assert!(
        chain
            .admit_stages(t0, &a, Stages::of(Stage::Account))
            .is_ok()
    );
    assert_eq!(
        chain.admit_stages(t0, &a, Stages::ALL).map_err(|r| r.stage),
        Err(Stage::Account)
    );
    assert_eq!(chain.trunk(0).available(t0), 1);
    assert!(Stages::ALL.without(Stage::Global).has(Stage::Account));
    assert!(!Stages::ALL.without(Stage::Global).has(Stage::Global));
}
