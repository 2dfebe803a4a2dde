//! libFuzzer target: the request frame decoder, bytes as a client sends them,
//! through the daemon's own `ServerTransport` (length-delimited codec with the
//! daemon's default request limit, then bincode into tarpc's
//! `ClientMessage<IdAllocRequest>`), as `tests/fuzz_decoders.rs` drives it on
//! stable. Seeds: `tests/fuzz_corpus/frame/`.
//!
//! Panics: the daemon's decoder catches a panic inside bincode/tarpc decoding
//! on purpose (`GuardedBincode` turns it into a decode error that closes only
//! that connection), but libfuzzer-sys's panic hook aborts on *every* panic,
//! caught or not. So this target replaces the hook with one that only records
//! the panic, and aborts (a crash for libFuzzer) when a panic escapes the
//! transport, which is what would take down the connection's task in the
//! daemon. Allocations are bounded by the `-malloc_limit_mb`/`-rss_limit_mb`
//! flags `.ci/fuzz` passes.
#![no_main]

use std::backtrace::Backtrace;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use futures::StreamExt;
use idalloc_client::protocol::{IdAllocRequest, IdAllocResponse};
use idalloc::server::transport::ServerTransport;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// The daemon's default `max_frame_bytes`.
const MAX_FRAME: usize = 65536;

thread_local! {
    /// The last panic seen on this thread: its message and location, and its
    /// backtrace (when `RUST_BACKTRACE` is set), symbolised only if reported.
    static LAST_PANIC: RefCell<Option<(String, Backtrace)>> = const { RefCell::new(None) };
}

/// One current-thread runtime for the whole run; also installs the recording
/// panic hook (after libfuzzer-sys's own, which it replaces).
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // Not symbolised here: the caught panics are frequent, and resolving a
        // backtrace reads the binary's debug info (hundreds of MB of RSS).
        std::panic::set_hook(Box::new(|info| {
            let report = (info.to_string(), Backtrace::capture());
            let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(report));
        }));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Decode every frame of `input` as the daemon does, until the stream ends or
/// fails; the number of requests that decoded.
fn decode_frames(rt: &Runtime, input: &[u8]) -> usize {
    rt.block_on(async {
        let (mut tx, rx) = tokio::io::duplex(input.len() + 64);
        tx.write_all(input).await.expect("duplex has room");
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

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| decode_frames(rt, data)));
    if outcome.is_err() {
        match LAST_PANIC.with(|p| p.borrow_mut().take()) {
            Some((msg, bt)) => eprintln!("the request frame decoder panicked: {msg}\n{bt}"),
            None => eprintln!("the request frame decoder panicked"),
        }
        std::process::abort();
    }
});
