//! Fuzzing on stable: the two decoders that take bytes from outside.
//!
//! - the request frame decoder: bytes as a client sends them, through the daemon's
//!   own `ServerTransport` (length-delimited codec with the request limit, then
//!   bincode into tarpc's `ClientMessage<IdAllocRequest>`);
//! - the manifest parser, `Manifest::parse`, on what the object store returns.
//!
//! Each target replays its corpus (`tests/fuzz_corpus/{frame,manifest}/`), then
//! mutates corpus entries (bit flips, interesting bytes, insertions, deletions,
//! splices, length-prefix fix-ups) for `IDALLOC_FUZZ_SECS` seconds (default 5;
//! `.ci/run` gives 30). A panic, or more than a bounded amount of memory held at
//! once while decoding one input, fails the test and prints the input in hex — add
//! it to the corpus once fixed. This runs in the ordinary `cargo test`, on
//! stable; the same two decoders also have cargo-fuzz (libFuzzer, nightly,
//! AddressSanitizer, coverage-guided) targets in `fuzz/fuzz_targets/`, seeded
//! from the same corpus and run by `.ci/fuzz` for 30 s each
//! (`IDALLOC_CARGO_FUZZ_SECS=600 .ci/fuzz` for longer; docs/guarantees.md,
//! "Fuzzing").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use idalloc::engine::store::manifest::Manifest;
use idalloc::server::transport::ServerTransport;
use idalloc_client::protocol::{IdAllocRequest, IdAllocResponse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Counts the bytes this thread holds, and its peak, so that one input's
/// allocations can be bounded.
struct Counting;

thread_local! {
    static HELD: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    /// Set while a fuzz target runs: its panics are caught and reported by `fuzz`.
    static IN_TARGET: Cell<bool> = const { Cell::new(false) };
}

fn note(delta: isize) {
    let _ = HELD.try_with(|h| {
        let now = (h.get() as isize + delta).max(0) as usize;
        h.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: delegates to the system allocator; the bookkeeping only touches
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(-(l.size() as isize));
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new as isize - l.size() as isize);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f`, returning its result and the most bytes it held at once beyond what
/// was held before.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = HELD.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

const MAX_FRAME: usize = 65536; // the daemon's default `max_frame_bytes`

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir(target))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(seeds.len() >= 3, "the {target} corpus is missing");
    seeds
}

fn fuzz_secs() -> u64 {
    std::env::var("IDALLOC_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Decode every frame of `input` as the daemon does; the number of requests that
/// decoded before the stream ended or failed.
fn decode_frames(rt: &tokio::runtime::Runtime, input: &[u8]) -> usize {
    rt.block_on(async {
        let (mut tx, rx) = tokio::io::duplex(input.len() + 64);
        tx.write_all(input).await.unwrap();
        drop(tx);
        let mut t: ServerTransport<_, IdAllocRequest, IdAllocResponse> =
            ServerTransport::new(rx, MAX_FRAME, CancellationToken::new());
        let mut n = 0;
        while let Some(item) = t.next().await {
            match item {
                Ok(_) => n += 1,
                Err(_) => break,
            }
        }
        n
    })
}

/// One mutation step on `data`, with `other` for splices.
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, other: &[u8]) {
    const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, 250, 251, 252, 253, 254];
    let len = data.len();
    match rng.gen_range(0..8) {
        0 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
        }
        2 => {
            let i = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            data.splice(i..i, bytes);
        }
        3 if len > 1 => {
            let i = rng.gen_range(0..len);
            let j = rng.gen_range(i..=len.min(i + 16));
            data.drain(i..j);
        }
        4 if len > 0 => {
            // A run of 0xff: huge varints, lengths and counts.
            let i = rng.gen_range(0..len);
            let n = rng.gen_range(1..=9).min(len - i);
            data[i..i + n].fill(0xff);
        }
        5 if !other.is_empty() => {
            let i = rng.gen_range(0..=len);
            let a = rng.gen_range(0..other.len());
            let b = rng.gen_range(a..=other.len());
            data.splice(i..i, other[a..b].iter().copied());
        }
        6 if len > 0 => data.truncate(rng.gen_range(0..len)),
        _ if len > 0 => {
            let i = rng.gen_range(0..len);
            data[i] = rng.gen();
        }
        _ => data.push(rng.gen()),
    }
}

/// Feed `target` the corpus, then mutants of it, until the time is up.
fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    max_held: impl Fn(&[u8]) -> usize,
    mut fixup: impl FnMut(&mut StdRng, &mut [u8]),
    mut target: impl FnMut(&[u8]),
) -> u64 {
    // Panics inside the target (those the daemon's decoder now catches, or a real
    // one, reported below with its input) are not printed: the hook's backtrace and
    // the test harness's growing capture buffer are not the decoder's memory.
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_TARGET.with(Cell::get) {
                default(info)
            }
        }))
    });
    let run = |input: &[u8], target: &mut dyn FnMut(&[u8])| {
        IN_TARGET.with(|t| t.set(true));
        let (r, held) =
            measured(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(input))));
        IN_TARGET.with(|t| t.set(false));
        if r.is_err() {
            panic!("{name}: the decoder panicked on input {}", hex(input));
        }
        assert!(
            held <= max_held(input),
            "{name}: {held} bytes held decoding {} input bytes: {}",
            input.len(),
            hex(input)
        );
    };
    for s in seeds {
        run(s, &mut target);
    }
    let seed: u64 = std::env::var("IDALLOC_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{name}: IDALLOC_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let end = Instant::now() + Duration::from_secs(fuzz_secs());
    let mut execs = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            let mut input = seeds[rng.gen_range(0..seeds.len())].clone();
            let other = &seeds[rng.gen_range(0..seeds.len())];
            for _ in 0..rng.gen_range(1..=8) {
                mutate(&mut rng, &mut input, other);
            }
            fixup(&mut rng, &mut input);
            run(&input, &mut target);
            execs += 1;
        }
    }
    eprintln!("{name}: {execs} inputs in {} s, no panic", fuzz_secs());
    execs
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Most of the time, rewrite the 4-byte length prefix to the body's length so the
/// mutant gets past the framing into bincode.
fn fix_length(rng: &mut StdRng, input: &mut [u8]) {
    if input.len() >= 4 && rng.gen_bool(0.8) {
        let n = (input.len() - 4) as u32;
        input[..4].copy_from_slice(&n.to_be_bytes());
    }
}

#[test]
fn fuzz_request_frame_decoder() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seeds = corpus("frame");
    // The valid requests of the corpus decode (else the corpus is stale and the
    // fuzzer would mostly test the framing).
    let valid: usize = seeds.iter().map(|s| decode_frames(&rt, s)).sum();
    assert!(valid >= 7, "only {valid} corpus frames decode");
    // A decode holds the frame buffer and the request; 1 MiB is far above
    // anything a 64 KiB frame can legitimately need.
    let execs = fuzz(
        "frame decoder",
        &seeds,
        |input| 2 * input.len() + (1 << 20),
        fix_length,
        |input| {
            decode_frames(&rt, input);
        },
    );
    assert!(execs > 100);
}

/// The regression the fuzzer found: a request whose deadline is `u64::MAX`
/// seconds away panicked in tarpc's `Instant::now() + deadline`. It must be an
/// ordinary decode error now, and the frame before it must still be served.
#[test]
fn request_with_an_overflowing_deadline_is_rejected_not_a_panic() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good = std::fs::read(corpus_dir("frame").join("reserve_primary_vid.bin")).unwrap();
    let bad = std::fs::read(corpus_dir("frame").join("regression_deadline_overflow.bin")).unwrap();
    assert_eq!(decode_frames(&rt, &good), 1);
    let mut both = good.clone();
    both.extend_from_slice(&bad);
    both.extend_from_slice(&good);
    let n = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_frames(&rt, &both)))
        .expect("decoding a frame with an overflowing deadline panicked");
    assert_eq!(
        n, 1,
        "the good frame is served, the bad one ends the stream"
    );
}

#[test]
fn fuzz_manifest_parser() {
    let seeds = corpus("manifest");
    let path = object_store::path::Path::from("id_allocator.json");
    assert!(seeds.iter().any(|s| Manifest::parse(&path, s).is_ok()));
    // serde_json's Value keeps maps and strings: bounded by a small multiple of the
    // input.
    let execs = fuzz(
        "manifest parser",
        &seeds,
        |input| 64 * input.len() + (1 << 16),
        |_, _| {},
        |input| {
            if let Ok(m) = Manifest::parse(&path, input) {
                // What parses must write back to the same ceilings (never a
                // silent change of a counter), and keep the unknown fields.
                let again = Manifest::parse(&path, &m.to_bytes()).expect("own output parses");
                assert_eq!(again.next_vid_batch, m.next_vid_batch);
                assert_eq!(again.next_eid_batch, m.next_eid_batch);
                assert_eq!(again.extra, m.extra);
            }
        },
    );
    assert!(execs > 100);
}
