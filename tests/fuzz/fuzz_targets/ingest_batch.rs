//! The collector's ingest of an agent's message: any bytes decode to a
//! message or an error; a batch is stored, skipped, kept out or refused by the store,
//! never a panic, and whatever was stored still verifies as a chain.

#![no_main]

use std::sync::OnceLock;

use driftwatch_collector::store::{sled_store::SledStore as Store, EventLog as _};
use driftwatch_proto::{
    chain::{event_body, Verifier},
    v1::{agent_message::Msg, AgentMessage},
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (_, store) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(dir.path()).expect("a store");
        (dir, store)
    });
    let Ok(m) = AgentMessage::decode(data) else {
        return;
    };
    let Some(Msg::Batch(b)) = m.msg else {
        return;
    };
    let node = b.events.first().map(|e| e.node.clone()).unwrap_or_default();
    if node.is_empty() || node.len() > 64 {
        return;
    }
    if store.append(&node, &b.events, 1).is_err() {
        return;
    }
    let agent = store.agent(&node).ok().flatten().unwrap_or_default();
    let mut v = Verifier::new(true).through_head(agent.chain_seq, &agent.chain_head);
    for block in store.node_chain(&node).expect("blocks of the node") {
        for e in block.expect("a readable block") {
            v.feed(e.seq, &e.chain, &event_body(&e))
                .unwrap_or_else(|b| panic!("stored history does not verify: {b:?}"));
        }
    }
    v.finish().expect("the head is in the history");
});
