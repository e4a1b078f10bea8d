//! Messages sent as bytes that were encoded before: the agent's spool keeps
//! each event encoded once, and a batch is those bytes framed as
//! `AgentMessage { batch: EventBatch { events } }` without decoding them
//! again (the load generators of the benches do the same).

use prost::bytes::{Buf, BufMut};

/// A message whose encoding is already known; it sends those bytes as they
/// are and ignores whatever it is asked to decode.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Appends one encoded `Event` to the body of an `EventBatch` (its field 1).
pub fn push_event(batch_body: &mut Vec<u8>, event: &[u8]) {
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, batch_body);
    prost::encoding::encode_varint(event.len() as u64, batch_body);
    batch_body.extend_from_slice(event);
}

/// The bytes a framed event adds to a batch body.
pub fn framed_len(event_len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(event_len as u64) + event_len
}

/// `AgentMessage { batch: EventBatch { <batch_body> } }`, encoded.
pub fn batch_message(batch_body: &[u8]) -> Raw {
    let mut out = Vec::with_capacity(batch_body.len() + 8);
    // AgentMessage.batch is field 2.
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(batch_body.len() as u64, &mut out);
    out.extend_from_slice(batch_body);
    Raw(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{agent_message::Msg, AgentMessage, Event};
    use prost::Message as _;

    #[test]
    fn a_framed_batch_decodes_as_the_events_it_was_made_of() {
        let events: Vec<Event> = (1..=3)
            .map(|seq| Event {
                seq,
                node: "n".into(),
                time_unix_nanos: seq as i64,
                ..Default::default()
            })
            .collect();
        let mut body = Vec::new();
        for e in &events {
            let bytes = e.encode_to_vec();
            let before = body.len();
            push_event(&mut body, &bytes);
            assert_eq!(body.len() - before, framed_len(bytes.len()));
        }
        let m = AgentMessage::decode(&*batch_message(&body).0).unwrap();
        let Some(Msg::Batch(b)) = m.msg else {
            panic!("not a batch: {m:?}")
        };
        assert_eq!(b.events, events);
    }
}
