//! Provider path validation on arbitrary strings: an accepted path never escapes the volume.
#![no_main]
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if secretfs::provider::validate::check_path(path).is_ok() {
        let p = Path::new(path);
        assert!(p.is_relative());
        assert!(p.components().all(|c| matches!(c, Component::Normal(_))), "{path:?}");
        assert!(!path.contains('\0'));
        assert!(p.components().all(|c| !c.as_os_str().to_string_lossy().starts_with("..")));
    }
    // The set check agrees with the single-path check on singletons.
    assert_eq!(
        secretfs::provider::validate::check_paths([path]).is_ok(),
        secretfs::provider::validate::check_path(path).is_ok()
    );
});
