//! SecretProviderClass YAML parsing on arbitrary text: never panics; parsed classes have a
//! name, a namespace and a provider.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(classes) = secretfs::class::parse_documents(text) {
        for c in classes {
            assert!(!c.name.is_empty() && !c.namespace.is_empty() && !c.provider.is_empty());
        }
    }
});
