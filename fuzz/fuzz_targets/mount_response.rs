//! Provider MountResponse validation on arbitrary protobuf bytes: never panics; an accepted
//! response has only safe relative paths, permission-only modes and fits the size limit.
#![no_main]
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use secretfs::proto::provider::MountResponse;
use secretfs::provider::ProviderClient;

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Ok(resp) = MountResponse::decode(data) else { return };
    let client = ProviderClient { dirs: vec![], timeout: Duration::from_secs(1), max_volume_bytes: LIMIT };
    if let Ok(snapshot) = client.accept("fuzz", resp, 0o644) {
        let mut total = 0;
        for f in snapshot.files() {
            assert!(secretfs::provider::validate::check_path(&f.path).is_ok(), "{:?}", f.path);
            assert!(f.mode <= 0o777 && f.mode != 0);
            total += f.bytes.len();
        }
        assert!(total <= LIMIT);
        assert!(!snapshot.versions().is_empty());
    }
});
