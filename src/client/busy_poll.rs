//! Waiting for a reply without letting the thread sleep ([`ClientConfig::busy_poll`]).
//!
//! A lone writer's round trip is mostly wake-ups, not work: on a VM whose guest
//! halts an idle vCPU at once, waking a thread that sleeps on the other vCPU goes
//! through the hypervisor (docs/performance.md, "Busy polling"). While a call is
//! the only busy-polling call in flight in this process (calls of clients with
//! polling off are not counted), the caller's task stays runnable for up to the
//! configured budget: it yields to its runtime, which then checks its sockets
//! without blocking and runs every other ready task, and to the kernel
//! (`sched_yield`), so that any thread waiting for this CPU runs first. The reply
//! is then read as soon as it lands. Past the budget, or with other polling calls
//! in flight (then the runtime has work anyway and spinning would only take CPU
//! from it), the call waits as usual.
//!
//! Invariant protected: none of the id invariants; this only changes how the caller
//! waits. What it must not do, and the tests check: change a call's result, or keep
//! the caller's other tasks from running.
//!
//! [`ClientConfig::busy_poll`]: super::ClientConfig::busy_poll

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Busy-polling calls (a nonzero budget) of every [`Client`](super::Client) in this
/// process now waiting for a reply. Calls with polling off are not counted: they
/// should cost nothing extra.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts one call in flight for as long as it lives, however it ends (a call
/// dropped by a timeout included).
struct InFlight;

impl InFlight {
    /// Count this call; true if it is the only one.
    fn enter() -> (InFlight, bool) {
        let before = IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        (InFlight, before == 0)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Await `reply`, spinning for up to `budget` first if it is the only busy-polling
/// call in flight.
pub(crate) async fn wait<F: Future>(reply: F, budget: Duration) -> F::Output {
    wait_counting(reply, budget).await.0
}

/// [`wait`], also returning how many times the call yielded while spinning.
async fn wait_counting<F: Future>(reply: F, budget: Duration) -> (F::Output, u64) {
    let mut reply = std::pin::pin!(reply);
    if budget.is_zero() {
        return (reply.await, 0);
    }
    let (_in_flight, alone) = InFlight::enter();
    let mut spins = 0;
    if alone {
        let until = Instant::now() + budget;
        loop {
            if let Poll::Ready(v) =
                std::future::poll_fn(|cx| Poll::Ready(reply.as_mut().poll(cx))).await
            {
                return (v, spins);
            }
            if Instant::now() >= until || IN_FLIGHT.load(Ordering::Acquire) > 1 {
                break;
            }
            spins += 1;
            std::thread::yield_now();
            tokio::task::yield_now().await;
        }
    }
    (reply.await, spins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    // IN_FLIGHT is process-wide: the tests that read it take this lock so that
    // they do not see each other's calls.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn a_ready_reply_is_returned_as_is() {
        let _serial = SERIAL.lock().await;
        assert_eq!(wait(async { 42 }, Duration::from_micros(200)).await, 42);
        assert_eq!(wait(async { 7 }, Duration::ZERO).await, 7);
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
    }

    /// A reply that takes longer than the budget still arrives, and while the call
    /// spins, the caller's other tasks on the same (single) thread keep running.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_reply_arrives_and_other_tasks_run_meanwhile() {
        let _serial = SERIAL.lock().await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        tokio::spawn(async move {
            // Runs only if the spinning call yields the thread.
            r.store(true, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send("late").unwrap();
        });
        let started = Instant::now();
        let (got, spins) =
            wait_counting(async { rx.await.unwrap() }, Duration::from_millis(5)).await;
        assert_eq!(got, "late");
        assert!(spins > 0, "a lone call spins before it parks");
        assert!(ran.load(Ordering::Acquire));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
    }

    /// A call dropped while waiting (a deadline) no longer counts as in flight, so
    /// the next lone call spins again.
    #[tokio::test]
    async fn a_dropped_call_leaves_the_count() {
        let _serial = SERIAL.lock().await;
        let never = std::future::pending::<()>();
        let timed_out = tokio::time::timeout(
            Duration::from_millis(5),
            wait(never, Duration::from_millis(1)),
        )
        .await;
        assert!(timed_out.is_err());
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
    }

    /// With another call in flight a call does not spin: concurrent calls keep
    /// the runtime busy anyway, and spinning would only take CPU from them.
    #[tokio::test(flavor = "current_thread")]
    async fn a_call_among_others_waits_without_spinning() {
        let _serial = SERIAL.lock().await;
        let (other, alone) = InFlight::enter();
        assert!(alone);
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let call = tokio::spawn(wait_counting(
            async { rx.await.unwrap() },
            Duration::from_secs(5),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 2);
        tx.send(9).unwrap();
        assert_eq!(call.await.unwrap(), (9, 0));
        drop(other);
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
    }
}
