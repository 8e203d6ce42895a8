//! NodePublishVolume validation on arbitrary protobuf bytes: never panics; what it accepts
//! names an absolute target, a volume id and a class.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use secretfs::proto::csi::NodePublishVolumeRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = NodePublishVolumeRequest::decode(data) else { return };
    if let Ok(ok) = secretfs::csi::publish_request(req) {
        assert!(!ok.volume_id.is_empty());
        assert!(ok.target.is_absolute());
        assert!(!ok.class_name.is_empty());
        assert!(ok.default_mode <= 0o777);
    }
});
