//! The agent's decoder of kernel records: any bytes from the ring buffer
//! give an event, bookkeeping or an error, never a panic, and the process
//! table it keeps stays usable.

#![no_main]

use std::sync::{Mutex, OnceLock};

use driftwatch_agent::{
    clock::Clock,
    identity::ProcessTable,
    policy::Policy,
    sensors::{decode::Decoder, watch::WatchSet},
};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = "apiVersion: driftwatch.dev/v1
kind: Policy
resources:
  - name: cfg
    kind: config
    paths: [/etc/app/, /srv/models/model.bin]
  - name: db
    kind: database
    ports: [5432]
";

static STATE: OnceLock<Mutex<(Decoder, WatchSet)>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let state = STATE.get_or_init(|| {
        let policy = Policy::parse("fuzz.yaml", POLICY).expect("the fuzz policy parses");
        let decoder = Decoder::new(
            "fuzz".into(),
            Clock::new(),
            ProcessTable::new(None, Clock::new()),
        );
        Mutex::new((decoder, WatchSet::from_policy(&policy)))
    });
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    let (decoder, watch) = &mut *guard;
    let _ = decoder.decode(data, watch);
});
