//! The hash chains that make stored history tamper-evident.
//!
//! Each stored event of a node (and each audit record) carries a chain
//! value: SHA-256 over the previous one's chain value (32 zero bytes for
//! the first) and its own encoding with the chain field empty. Altering,
//! removing or reordering a stored event breaks the chain at the first
//! event after the change, and removing the newest ones leaves a history
//! that ends short of the head the collector records for the node.

use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::v1::{AuditRecord, Event};

/// A chain value.
pub type Link = [u8; 32];

/// What comes before the first link.
pub const GENESIS: Link = [0; 32];

/// The chain value after `prev` for a record whose encoding (chain field
/// empty) is `body`.
pub fn link(prev: &Link, body: &[u8]) -> Link {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// The encoding of an event that its chain value covers.
pub fn event_body(e: &Event) -> Vec<u8> {
    if e.chain.is_empty() {
        return e.encode_to_vec();
    }
    let mut plain = e.clone();
    plain.chain.clear();
    plain.encode_to_vec()
}

/// The encoding of an audit record that its chain value covers.
pub fn audit_body(r: &AuditRecord) -> Vec<u8> {
    let mut plain = r.clone();
    plain.chain.clear();
    plain.encode_to_vec()
}

/// The first place a chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The sequence number of the first record that does not verify.
    pub seq: u64,
    /// Why.
    pub reason: String,
}

/// Checks records of one chain fed in sequence order. The first record fed
/// is taken as given (its predecessor may have been removed by retention,
/// or lie before the window checked) unless it is the chain's first
/// (`from_start`); every later one must follow from it.
#[derive(Debug)]
pub struct Verifier {
    prev: Option<(u64, Link)>,
    checked: u64,
    /// A head recorded earlier that the history must pass through (records
    /// may have been added after it was read).
    head: Option<(u64, Vec<u8>, bool)>,
}

impl Verifier {
    /// A verifier; with `from_start` the first record must follow from
    /// [`GENESIS`].
    pub fn new(from_start: bool) -> Self {
        Self {
            prev: from_start.then_some((0, GENESIS)),
            checked: 0,
            head: None,
        }
    }

    /// The history must pass through this recorded head: the record
    /// `seq` must be there with this chain value. Records after it (added
    /// since the head was read) are checked like the rest.
    pub fn through_head(mut self, seq: u64, link: &[u8]) -> Self {
        self.head = Some((seq, link.to_vec(), seq == 0));
        self
    }

    /// After the last record: whether the recorded head was passed.
    pub fn finish(&self) -> Result<(), Broken> {
        match (&self.head, self.prev) {
            (None, _) | (Some((_, _, true)), _) => Ok(()),
            (Some((head_seq, _, false)), Some((seq, _))) if seq < *head_seq => Err(Broken {
                seq: seq + 1,
                reason: format!(
                    "the history ends at sequence {seq}, but the collector recorded events through {head_seq}: the newest were removed"
                ),
            }),
            (Some((head_seq, _, false)), None) => Err(Broken {
                seq: *head_seq,
                reason: "no events, but the collector recorded some".into(),
            }),
            (Some((head_seq, _, false)), Some(_)) => Err(Broken {
                seq: *head_seq,
                reason: "the recorded head is not in the history".into(),
            }),
        }
    }

    /// Records checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The last record's sequence number and chain value.
    pub fn head(&self) -> Option<(u64, Link)> {
        self.prev
    }

    /// Feeds the next record: its sequence number, its stored chain value
    /// and its body.
    pub fn feed(&mut self, seq: u64, chain: &[u8], body: &[u8]) -> Result<(), Broken> {
        let stored: Link = chain.try_into().map_err(|_| Broken {
            seq,
            reason: format!("no chain value (a {}-byte field)", chain.len()),
        })?;
        if let Some((prev_seq, prev)) = self.prev {
            if seq <= prev_seq {
                return Err(Broken {
                    seq,
                    reason: format!("out of order: follows sequence {prev_seq}"),
                });
            }
            if link(&prev, body) != stored {
                return Err(Broken {
                    seq,
                    reason: format!(
                        "its content or its place does not match the chain: it was altered, or events between {prev_seq} and {seq} were removed or reordered"
                    ),
                });
            }
        }
        if let Some((head_seq, head, seen)) = &mut self.head {
            if *head_seq == seq {
                if head.as_slice() != stored.as_slice() {
                    return Err(Broken {
                        seq,
                        reason: format!(
                            "it is not the event the collector recorded as the head (sequence {seq})"
                        ),
                    });
                }
                *seen = true;
            }
        }
        self.prev = Some((seq, stored));
        self.checked += 1;
        Ok(())
    }
}

/// Hex of a chain value.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A chain value from hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chained(n: u64) -> Vec<Event> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let mut e = Event {
                    seq,
                    node: "n".into(),
                    time_unix_nanos: seq as i64,
                    ..Default::default()
                };
                prev = link(&prev, &event_body(&e));
                e.chain = prev.to_vec();
                e
            })
            .collect()
    }

    fn verify(events: &[Event], head: Option<(u64, &[u8])>) -> Result<(), Broken> {
        let mut v = Verifier::new(true);
        if let Some((s, h)) = head {
            v = v.through_head(s, h);
        }
        for e in events {
            v.feed(e.seq, &e.chain, &event_body(e))?;
        }
        v.finish()
    }

    #[test]
    fn an_honest_chain_verifies_and_each_kind_of_tampering_is_named() {
        let events = chained(5);
        let head = events[4].chain.clone();
        assert_eq!(verify(&events, Some((5, &head))), Ok(()));

        let mut altered = events.clone();
        altered[2].node = "m".into();
        assert_eq!(verify(&altered, None).unwrap_err().seq, 3);

        let mut removed = events.clone();
        removed.remove(1);
        assert_eq!(verify(&removed, None).unwrap_err().seq, 3);

        let mut swapped = events.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(&swapped, None).unwrap_err().seq, 3);

        let truncated = &events[..3];
        let e = verify(truncated, Some((5, &head))).unwrap_err();
        assert_eq!(e.seq, 4);
        assert!(e.reason.contains("removed"), "{e:?}");
    }
}
