use super::*;
use driftwatch_proto::v1::{FileChange, Process};

fn ev(node: &str, seq: u64, t: i64, path: &str, exec_id: &str) -> Event {
    Event {
        event: Some(event::Event::File(FileChange {
            op: "open".into(),
            path: path.into(),
            ..Default::default()
        })),
        process: Some(Process {
            exec_id: exec_id.into(),
            ..Default::default()
        }),
        seq,
        time_unix_nanos: t,
        node: node.into(),
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .hello(
            &NodeInfo {
                name: "n1".into(),
                ..Default::default()
            },
            1,
        )
        .unwrap();
    (dir, store)
}

#[test]
fn redelivery_is_stored_once_and_holes_are_refused() {
    let (_d, s) = open();
    let batch: Vec<Event> = (1..=5)
        .map(|i| ev("n1", i, 100 + i as i64, "/a", "x"))
        .collect();
    assert_eq!(s.append("n1", &batch).unwrap(), 5);
    assert_eq!(
        s.append("n1", &batch[2..]).unwrap(),
        5,
        "redelivery is a no-op"
    );
    assert_eq!(s.len(), 5);
    let err = s.append("n1", &[ev("n1", 7, 200, "/a", "x")]).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OutOfOrder {
                expected: 6,
                got: 7
            }
        ),
        "{err}"
    );
    assert_eq!(s.len(), 5, "nothing of a refused batch is stored");
    // A valid prefix is kept; the rest of the batch is refused.
    let mixed = [ev("n1", 6, 201, "/a", "x"), ev("n1", 8, 202, "/a", "x")];
    assert!(s.append("n1", &mixed).is_err());
    assert_eq!(s.agent("n1").unwrap().unwrap().acked_seq, 6);
}

#[test]
fn events_must_belong_to_the_stream_and_be_well_formed() {
    let (_d, s) = open();
    let mut other = ev("n2", 1, 100, "/a", "x");
    assert!(matches!(
        s.append("n1", &[other.clone()]),
        Err(StoreError::Invalid { .. })
    ));
    other.node = "n1".into();
    other.event = None;
    assert!(matches!(
        s.append("n1", &[other]),
        Err(StoreError::Invalid { .. })
    ));
    assert!(s.is_empty());
}

#[test]
fn a_time_window_is_a_range_scan_in_time_order_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path()).unwrap();
        s.hello(
            &NodeInfo {
                name: "n1".into(),
                ..Default::default()
            },
            1,
        )
        .unwrap();
        let batch: Vec<Event> = (1..=100)
            .map(|i| ev("n1", i, 1_000 + i as i64 * 10, "/a", "x"))
            .collect();
        s.append("n1", &batch).unwrap();
        futures_flush(&s);
    }
    let s = Store::open(dir.path()).unwrap();
    let got: Vec<u64> = s
        .node_range("n1", 1_200, 1_300)
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(got, (20..30).collect::<Vec<u64>>());
    assert_eq!(s.agent("n1").unwrap().unwrap().acked_seq, 100);
}

fn futures_flush(s: &Store) {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(s.flush())
        .unwrap();
}

#[test]
fn exec_id_and_path_indexes() {
    let (_d, s) = open();
    s.append(
        "n1",
        &[
            ev("n1", 1, 10, "/etc/app/a.conf", "e1"),
            ev("n1", 2, 20, "/etc/other", "e2"),
            ev("n1", 3, 30, "/etc/app/b.conf", "e1"),
        ],
    )
    .unwrap();
    let by_exec: Vec<u64> = s
        .indexed(false, "e1", true)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(by_exec, [1, 3]);
    let by_path: Vec<u64> = s
        .indexed(true, "/etc/app/", false)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(by_path, [1, 3]);
}

#[test]
fn dropped_ranges_are_gaps_that_move_the_ack() {
    let (_d, s) = open();
    s.append("n1", &[ev("n1", 1, 10, "/a", "x")]).unwrap();
    s.add_gap(&Gap {
        node: "n1".into(),
        from_seq: 2,
        to_seq: 9,
        reason: "agent_dropped".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.append("n1", &[ev("n1", 10, 50, "/a", "x")]).unwrap(), 10);
    assert_eq!(s.gaps("n1").unwrap().len(), 1);
}

#[test]
fn retention_by_age() {
    let (_d, s) = open();
    let batch: Vec<Event> = (1..=10)
        .map(|i| ev("n1", i, i as i64 * 100, "/a", "x"))
        .collect();
    s.append("n1", &batch).unwrap();
    assert_eq!(s.retain(501, 0).unwrap(), 5);
    let left: Vec<u64> = s
        .node_range("n1", i64::MIN, i64::MAX)
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(left, [6, 7, 8, 9, 10]);
    // Index entries of removed events are skipped, not returned.
    assert_eq!(s.indexed(false, "x", true).unwrap().len(), 5);
}
