//! The baseline manifest parser (`sha256sum` output): any text is a list
//! of absolute paths with SHA-256 digests, or an error naming the line.

#![no_main]

use driftwatch_collector::correlate::baselines::parse_manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for root in [None, Some("/srv/app")] {
        if let Ok(entries) = parse_manifest("fuzz.sha256", &text, root) {
            for (path, sha) in entries {
                assert!(path.starts_with('/'), "{path:?} is not absolute");
                assert!(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
            }
        }
    }
});
