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
//! So spinning backs off when it does not pay: a call whose budget runs out
//! before its reply (the daemon is busy, or the reply is slow for any reason)
//! makes the next 2, 4, ... up to 64 lone calls wait without spinning; a reply
//! that lands while spinning resets that. A lone writer's replies land within the
//! budget and it keeps spinning; under contention replies take longer than the
//! budget and the cost falls to one spin in 64 calls.
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
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Busy-polling calls (a nonzero budget) of every [`Client`](super::Client) in this
/// process now waiting for a reply. Calls with polling off are not counted: they
/// should cost nothing extra.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Consecutive lone calls whose budget ran out before their reply, capped at
/// [`MAX_MISS_SHIFT`].
static MISSES: AtomicU32 = AtomicU32::new(0);

/// Lone calls still to wait without spinning after the last miss.
static SKIP: AtomicU32 = AtomicU32::new(0);

/// After `n` misses in a row the next `2^n` lone calls do not spin: at most 64.
const MAX_MISS_SHIFT: u32 = 6;

/// Whether this lone call may spin: false while a back-off is running (and then
/// counts this call against it).
fn may_spin() -> bool {
    SKIP.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| s.checked_sub(1))
        .is_err()
}

/// The reply landed while spinning: spinning pays, stop backing off.
fn hit() {
    MISSES.store(0, Ordering::Release);
}

/// The budget ran out first: back off for twice as many calls as last time.
fn miss() {
    let bump = |m: u32| (m + 1).min(MAX_MISS_SHIFT);
    let (Ok(before) | Err(before)) =
        MISSES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| Some(bump(m)));
    SKIP.store(1 << bump(before), Ordering::Release);
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
    let (_in_flight, alone) = InFlight::enter();
    let mut spins = 0;
    if alone && may_spin() {
        let until = Instant::now() + budget;
        loop {
            if let Poll::Ready(v) =
                std::future::poll_fn(|cx| Poll::Ready(reply.as_mut().poll(cx))).await
            {
                if spins > 0 {
                    hit();
                }
                return (v, spins);
            }
            // Another call joining is no verdict on spinning; only the budget is.
            if IN_FLIGHT.load(Ordering::Acquire) > 1 {
                break;
            }
            if Instant::now() >= until {
                miss();
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

    // The state is process-wide: every test takes this lock, so that none sees
    // another's calls, and starts with no back-off running.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
        let guard = SERIAL.lock().await;
        MISSES.store(0, Ordering::Release);
        SKIP.store(0, Ordering::Release);
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

    /// Replies slower than the budget (a busy daemon) make lone calls stop
    /// spinning for 2, then 4, ... calls, up to 64; one reply that lands while
    /// spinning makes the next call spin again.
    #[tokio::test(flavor = "current_thread")]
    async fn spinning_backs_off_while_replies_outlast_the_budget() {
        let _serial = serial().await;
        let budget = Duration::from_micros(200);
        let slow = Duration::from_millis(2);
        let mut pattern = Vec::new();
        for _ in 0..1 + 2 + 1 + 4 + 1 {
            pattern.push(wait_counting(reply_in(slow), budget).await.1 > 0);
        }
        let (s, w) = (true, false);
        assert_eq!(pattern, [s, w, w, s, w, w, w, w, s]);
        // The back-off after each further spinning call: doubling, capped at 64.
        let mut backoffs = Vec::new();
        for _ in 0..250 {
            if wait_counting(reply_in(slow), budget).await.1 > 0 {
                backoffs.push(SKIP.load(Ordering::Acquire));
            }
        }
        assert_eq!(backoffs, [16, 32, 64, 64, 64]);
        // Wait out the back-off, then a reply within the budget is a hit.
        while SKIP.load(Ordering::Acquire) > 0 {
            assert_eq!(wait_counting(reply_after(3), budget).await.1, 0);
        }
        let (_, spins) = wait_counting(reply_after(3), budget).await;
        assert!(spins > 0);
        assert_eq!(MISSES.load(Ordering::Acquire), 0);
        assert!(wait_counting(reply_in(slow), budget).await.1 > 0);
        assert_eq!(
            SKIP.load(Ordering::Acquire),
            2,
            "a fresh miss backs off for 2 again"
        );
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
