use super::*;
use crate::store::tests::{ev, on_every_backend, TestLog};
use driftwatch_proto::v1::NodeInfo;

/// Three nodes, 2,500 events each over 25 ms, many sharing a timestamp
/// (within a node and across nodes), so pages end inside a bucket and in
/// the middle of equal times.
fn fill(t: &TestLog) {
    let s = t.log();
    for node in ["a", "b", "c"] {
        s.hello(
            &NodeInfo {
                name: node.into(),
                ..Default::default()
            },
            1,
            1,
        )
        .unwrap();
        let batch: Vec<Event> = (1..=2500)
            .map(|i| {
                ev(
                    node,
                    i,
                    1_000_000 + (i as i64 / 7) * 70_000,
                    &format!("/d{}/f", i % 3),
                    &format!("x{}", i % 2),
                )
            })
            .collect();
        assert_eq!(s.append(node, &batch, 1).unwrap().through, 2500);
    }
    s.add_gap(&Gap {
        node: "b".into(),
        from_time_unix_nanos: 1_000_000 + 100 * 70_000,
        to_time_unix_nanos: 1_000_000 + 101 * 70_000,
        reason: "agent_offline".into(),
        ..Default::default()
    })
    .unwrap();
}

on_every_backend!(
    fill;
    a_walk_over_many_pages_is_complete_ordered_and_without_repeats,
    a_limited_walk_is_the_head_of_the_full_one_and_stops_when_the_reader_goes,
);

fn run(s: &dyn EventLog, r: &TimelineRequest) -> Vec<String> {
    let mut out = Vec::new();
    walk(s, r, &mut |item| {
        out.push(match item.item {
            Some(timeline_item::Item::Event(e)) => {
                format!("{} {} {}", e.time_unix_nanos, e.node, e.seq)
            }
            Some(timeline_item::Item::Gap(g)) => {
                format!("{} gap {}", g.from_time_unix_nanos, g.node)
            }
            None => "none".into(),
        });
        true
    })
    .unwrap();
    out
}

/// What a walk must produce: every matching event sorted, gaps by start.
fn expected(
    s: &dyn EventLog,
    r: &TimelineRequest,
    keep: impl Fn(&Event) -> bool,
) -> Vec<(i64, String)> {
    let mut all: Vec<Event> = ["a", "b", "c"]
        .iter()
        .flat_map(|n| s.node_range(n, i64::MIN, i64::MAX).unwrap())
        .filter(|e| matches(r, e) && keep(e))
        .collect();
    all.sort_by(|a, b| order(a).cmp(&order(b)));
    all.iter()
        .map(|e| {
            (
                e.time_unix_nanos,
                format!("{} {} {}", e.time_unix_nanos, e.node, e.seq),
            )
        })
        .collect()
}

fn a_walk_over_many_pages_is_complete_ordered_and_without_repeats(t: &mut TestLog) {
    let s = t.log();
    let since = 1_000_000 + 30 * 70_000;
    for r in [
        TimelineRequest {
            since_unix_nanos: since,
            ..Default::default()
        },
        TimelineRequest {
            node: "b".into(),
            ..Default::default()
        },
        TimelineRequest {
            path_prefix: "/d1/".into(),
            since_unix_nanos: since,
            ..Default::default()
        },
        TimelineRequest {
            exec_id: "x1".into(),
            ..Default::default()
        },
    ] {
        let got = run(s, &r);
        let events: Vec<String> = got.iter().filter(|l| !l.contains("gap")).cloned().collect();
        let want = expected(s, &r, |_| true);
        assert!(
            want.len() > 4 * FIRST_PAGE,
            "{}: the case needs several pages",
            want.len()
        );
        assert_eq!(events, want.iter().map(|w| w.1.clone()).collect::<Vec<_>>());
        // The gap sits in order among the events (after those at its start).
        if r.exec_id.is_empty() && r.path_prefix.is_empty() {
            let at = got
                .iter()
                .position(|l| l.contains("gap"))
                .expect("gap shown");
            let t: i64 = got[at].split(' ').next().unwrap().parse().unwrap();
            assert!(got[..at]
                .iter()
                .all(|l| l.split(' ').next().unwrap().parse::<i64>().unwrap() <= t));
            assert!(got[at + 1..].iter().all(|l| l
                .split(' ')
                .next()
                .unwrap()
                .parse::<i64>()
                .unwrap()
                >= t));
        }
    }
}

fn a_limited_walk_is_the_head_of_the_full_one_and_stops_when_the_reader_goes(t: &mut TestLog) {
    let s = t.log();
    let r = TimelineRequest {
        limit: 1500,
        ..Default::default()
    };
    let got: Vec<String> = run(s, &r)
        .into_iter()
        .filter(|l| !l.contains("gap"))
        .collect();
    let want: Vec<String> = expected(s, &r, |_| true)
        .into_iter()
        .take(1500)
        .map(|w| w.1)
        .collect();
    assert_eq!(got, want);

    let mut n = 0;
    walk(s, &TimelineRequest::default(), &mut |_| {
        n += 1;
        n < 10
    })
    .unwrap();
    assert_eq!(n, 10, "nothing is sent after the reader went away");
}
