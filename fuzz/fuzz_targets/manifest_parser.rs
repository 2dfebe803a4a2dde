//! libFuzzer target: `Manifest::parse` on what the object store returns, as
//! `tests/fuzz_decoders.rs` drives it on stable. Seeds:
//! `tests/fuzz_corpus/manifest/`. Any panic is a crash (libfuzzer-sys's hook
//! aborts); allocations are bounded by the `-malloc_limit_mb`/`-rss_limit_mb`
//! flags `.ci/fuzz` passes. Whatever parses must write back to the same
//! ceilings and keep its unknown fields.
#![no_main]

use std::sync::OnceLock;

use idalloc::engine::store::manifest::Manifest;
use libfuzzer_sys::fuzz_target;
use object_store::path::Path;

fn path() -> &'static Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    PATH.get_or_init(|| Path::from("id_allocator.json"))
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    if let Ok(m) = Manifest::parse(path, data) {
        let again = Manifest::parse(path, &m.to_bytes()).expect("own output parses");
        assert_eq!(again.next_vid_batch, m.next_vid_batch);
        assert_eq!(again.next_eid_batch, m.next_eid_batch);
        assert_eq!(again.extra, m.extra);
    }
});
