//! The policy parser (agent and collector): any text is a policy or an
//! error naming what is wrong, in bounded time and memory.

#![no_main]

use driftwatch_proto::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = Policy::parse("fuzz.yaml", &text) {
        // What parsed can be used: every resource is found by its name.
        for r in &p.resources {
            assert!(p.resource(&r.name).is_some());
        }
    }
});
