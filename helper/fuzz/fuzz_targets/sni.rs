//! The TLS ClientHello SNI parser (helper/src/egress/sni.rs) on arbitrary
//! bytes: it must never panic, and a name it returns must be one the
//! egress server can compare (non-empty printable ASCII, <= 255 bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/egress/sni.rs"]
#[allow(dead_code)]
mod sni;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(name)) = sni::client_hello_sni(data) {
        assert!(!name.is_empty() && name.len() <= 255);
        assert!(name.bytes().all(|b| b.is_ascii_graphic()));
    }
    if let Some(header) = data.get(..sni::RECORD_HEADER) {
        let header: [u8; sni::RECORD_HEADER] = header.try_into().unwrap();
        if let Ok(len) = sni::record_body_len(&header) {
            assert!(len <= sni::MAX_RECORD_BODY);
        }
    }
});
