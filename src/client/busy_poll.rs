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
//! The process-wide count cannot see other processes: sixteen writer processes
//! with one call each would all spin, on a machine whose cores the daemon needs.
//! So a call spins only while replies have been coming back within the budget: the
//! process keeps a moving average of its calls' round trips (spinning or not), and a
//! lone call whose average is past the budget waits as usual. A lone writer's round
//! trip (~0.1 ms here) stays under the budget and it keeps spinning; when the daemon
//! is busy with many writers, round trips grow past the budget and nobody spins,
//! until they shrink again. Spinning for a reply that would not come within the
//! budget buys nothing anyway: the caller sleeps for it in the end.
//!
//! Calls made where nobody waits for the reply, the allocator's background
//! prefetch, run inside [`quiet`] and never spin: the writer is served from its
//! current range meanwhile, so spinning would buy no latency for the CPU it costs.
//!
//! Invariant protected: none of the id invariants; this only changes how the caller
//! waits. What it must not do, and the tests check: change a call's result, or keep
//! the caller's other tasks from running.
//!
//! [`ClientConfig::busy_poll`]: super::ClientConfig::busy_poll

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Busy-polling calls (a nonzero budget) of every [`Client`](super::Client) in this
/// process now waiting for a reply. Calls with polling off are not counted: they
/// should cost nothing extra.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Moving average of this process's round trips (polling clients, outside
/// [`quiet`]), in nanoseconds; each call moves it 1/8 of the way to its own. Plain
/// loads and stores: a lost update among racing calls only delays the average a
/// little, and it steers nothing but whether to spin.
static ROUND_TRIP_NS: AtomicU64 = AtomicU64::new(0);

/// Whether replies have lately come back within `budget`.
fn replies_within(budget: Duration) -> bool {
    u128::from(ROUND_TRIP_NS.load(Ordering::Relaxed)) < budget.as_nanos()
}

/// Fold one call's round trip into the average.
fn record(round_trip: Duration) {
    let sample = u64::try_from(round_trip.as_nanos()).unwrap_or(u64::MAX);
    let avg = ROUND_TRIP_NS.load(Ordering::Relaxed);
    ROUND_TRIP_NS.store(avg - avg / 8 + sample / 8, Ordering::Relaxed);
}

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

tokio::task_local! {
    /// Set inside [`quiet`]: calls made there wait without spinning.
    static QUIET: ();
}

/// Run `work` with busy polling off for every call it makes (on this task).
pub(crate) async fn quiet<F: Future>(work: F) -> F::Output {
    QUIET.scope((), work).await
}

/// Await `reply`, spinning for up to `budget` first if it is the only busy-polling
/// call in flight (and not made inside [`quiet`]).
pub(crate) async fn wait<F: Future>(reply: F, budget: Duration) -> F::Output {
    wait_counting(reply, budget).await.0
}

/// [`wait`], also returning how many times the call yielded while spinning.
async fn wait_counting<F: Future>(reply: F, budget: Duration) -> (F::Output, u64) {
    let mut reply = std::pin::pin!(reply);
    if budget.is_zero() || QUIET.try_with(|_| ()).is_ok() {
        return (reply.await, 0);
    }
    let started = Instant::now();
    let (_in_flight, alone) = InFlight::enter();
    let mut spins = 0;
    if alone && replies_within(budget) {
        let until = started + budget;
        loop {
            if let Poll::Ready(v) =
                std::future::poll_fn(|cx| Poll::Ready(reply.as_mut().poll(cx))).await
            {
                record(started.elapsed());
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
    let v = reply.await;
    record(started.elapsed());
    (v, spins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    // The state is process-wide: every test takes this lock, so that none sees
    // another's calls, and starts with no round trips recorded.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
        let guard = SERIAL.lock().await;
        ROUND_TRIP_NS.store(0, Ordering::Relaxed);
        guard
    }

    /// A reply that is `delay` away (tokio's timer: a millisecond at the finest).
    fn reply_in(delay: Duration) -> impl Future<Output = ()> {
        tokio::time::sleep(delay)
    }

    /// A reply that lands after `polls` polls: within any budget for a caller that
    /// spins, and it wakes its task itself for one that does not.
    fn reply_after(mut polls: u32) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            if polls == 0 {
                return Poll::Ready(());
            }
            polls -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
    }

    #[tokio::test]
    async fn a_ready_reply_is_returned_as_is() {
        let _serial = serial().await;
        assert_eq!(wait(async { 42 }, Duration::from_micros(200)).await, 42);
        assert_eq!(wait(async { 7 }, Duration::ZERO).await, 7);
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
    }

    /// A reply that takes longer than the budget still arrives, and while the call
    /// spins, the caller's other tasks on the same (single) thread keep running.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_reply_arrives_and_other_tasks_run_meanwhile() {
        let _serial = serial().await;
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
        let _serial = serial().await;
        let never = std::future::pending::<()>();
        let timed_out = tokio::time::timeout(
            Duration::from_millis(5),
            wait(never, Duration::from_millis(1)),
        )
        .await;
        assert!(timed_out.is_err());
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
    }

    /// A call inside `quiet` (the background prefetch) neither spins nor counts as
    /// in flight, so it also leaves a writer's own lone call free to spin.
    #[tokio::test(flavor = "current_thread")]
    async fn a_quiet_call_does_not_spin() {
        let _serial = serial().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let call = tokio::spawn(quiet(async {
            wait_counting(async { rx.await.unwrap() }, Duration::from_secs(5)).await
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(IN_FLIGHT.load(Ordering::Acquire), 0);
        tx.send(3).unwrap();
        assert_eq!(call.await.unwrap(), (3, 0));
        // Outside the scope the same call spins again.
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let call = tokio::spawn(wait_counting(
            async { rx.await.unwrap() },
            Duration::from_secs(5),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(4).unwrap();
        let (got, spins) = call.await.unwrap();
        assert_eq!(got, 4);
        assert!(spins > 0);
    }

    /// Replies slower than the budget (a busy daemon) stop lone calls from
    /// spinning; once replies come back within it again, lone calls spin again.
    #[tokio::test(flavor = "current_thread")]
    async fn spinning_stops_while_replies_outlast_the_budget() {
        let _serial = serial().await;
        let budget = Duration::from_micros(200);
        let slow = Duration::from_millis(2);
        assert!(wait_counting(reply_in(slow), budget).await.1 > 0);
        // One 2 ms round trip moves the average past 200 µs.
        for _ in 0..20 {
            assert_eq!(wait_counting(reply_in(slow), budget).await.1, 0);
        }
        assert!(!replies_within(budget));
        // Fast replies bring it back under the budget within a few calls (each
        // takes 1/8 off the distance), and the next lone call spins.
        let mut calls = 0;
        while !replies_within(budget) {
            assert_eq!(wait_counting(reply_after(3), budget).await.1, 0);
            calls += 1;
            assert!(calls < 40, "the average never fell back under the budget");
        }
        assert!(wait_counting(reply_after(3), budget).await.1 > 0);
    }

    /// With another call in flight a call does not spin: concurrent calls keep
    /// the runtime busy anyway, and spinning would only take CPU from them.
    #[tokio::test(flavor = "current_thread")]
    async fn a_call_among_others_waits_without_spinning() {
        let _serial = serial().await;
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
