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
//! So a call spins only while replies come well within the budget: the process
//! keeps a moving average of its lone calls' round trips (spinning or not, each
//! taken as at most twice the budget), and a lone call spins while that is under
//! three quarters of the budget. A lone writer's round trip (70–90 µs spinning,
//! about 130 µs sleeping here, against a 200 µs budget) passes, and it spins. When
//! other writers keep the daemon and the cores busy, round trips grow past it and
//! calls sleep: spinning would have run out of budget, or nearly, and taken CPU
//! that the others need. One lone call in [`PROBE_EVERY`] spins anyway while the
//! average says no, so that a writer whose sleeping round trip sits just above the
//! mark (a slower day) still finds out that spinning brings it well under.
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

/// Moving average of this process's lone round trips (polling clients, outside
/// [`quiet`]) in nanoseconds, spinning or not; 0 = no call yet. Plain loads and
/// stores: a lost update among racing calls only delays the average a little, and
/// it steers nothing but whether to spin.
static ROUND_TRIP_NS: AtomicU64 = AtomicU64::new(0);

/// Lone calls so far, to pick the probes.
static LONE_CALLS: AtomicU64 = AtomicU64::new(0);

/// While the average says not to spin, one lone call in this many spins anyway.
/// Rare enough to stay out of the p99: a probe that spins on a machine busy with
/// other writers yields its CPU to them and may be slow.
const PROBE_EVERY: u64 = 256;

/// How far one call moves the average, as a shift: an eighth of the way, half
/// for a probe (they are few, and should be able to turn the decision).
const STEP: u32 = 3;
const PROBE_STEP: u32 = 1;

/// Whether this lone call should spin for up to `budget` (and count it), and how
/// far its round trip moves the average.
fn should_spin(budget: Duration) -> (bool, u32) {
    let n = LONE_CALLS.fetch_add(1, Ordering::Relaxed);
    let average = u128::from(ROUND_TRIP_NS.load(Ordering::Relaxed));
    if average < budget.as_nanos() * 3 / 4 {
        (true, STEP)
    } else if n.is_multiple_of(PROBE_EVERY) {
        (true, PROBE_STEP)
    } else {
        (false, STEP)
    }
}

/// Move the average `1 / 2^step` of the way to one round trip, taken as at most
/// twice the budget. The cap keeps one slow reply (a lone writer's p99 is a few
/// hundred microseconds: the disk) from pushing a spinning writer's average past
/// the mark on its own; sustained load still takes it there.
fn record(round_trip: Duration, step: u32, budget: Duration) {
    let cap = budget.saturating_mul(2);
    let sample = u64::try_from(round_trip.min(cap).as_nanos()).unwrap_or(u64::MAX);
    let old = ROUND_TRIP_NS.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        old - (old >> step) + (sample >> step)
    };
    ROUND_TRIP_NS.store(new.max(1), Ordering::Relaxed);
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

/// Whether this task is inside [`quiet`].
pub(crate) fn is_quiet() -> bool {
    QUIET.try_with(|_| ()).is_ok()
}

/// Await `reply`, spinning for up to `budget` first if it is the only busy-polling
/// call in flight (and not made inside [`quiet`]).
pub(crate) async fn wait<F: Future>(reply: F, budget: Duration) -> F::Output {
    wait_counting(reply, budget).await.0
}

/// [`wait`], also returning how many times the call yielded while spinning.
async fn wait_counting<F: Future>(reply: F, budget: Duration) -> (F::Output, u64) {
    let mut reply = std::pin::pin!(reply);
    if budget.is_zero() || is_quiet() {
        return (reply.await, 0);
    }
    let started = Instant::now();
    let (_in_flight, alone) = InFlight::enter();
    if !alone {
        return (reply.await, 0);
    }
    let (spin, step) = should_spin(budget);
    if !spin {
        let v = reply.await;
        record(started.elapsed(), step, budget);
        return (v, 0);
    }
    let until = started + budget;
    let mut spins = 0;
    loop {
        if let Poll::Ready(v) =
            std::future::poll_fn(|cx| Poll::Ready(reply.as_mut().poll(cx))).await
        {
            record(started.elapsed(), step, budget);
            return (v, spins);
        }
        if IN_FLIGHT.load(Ordering::Acquire) > 1 {
            // No longer alone: this round trip says nothing about a lone call's.
            return (reply.await, spins);
        }
        if Instant::now() >= until {
            break;
        }
        spins += 1;
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
    let v = reply.await;
    record(started.elapsed(), step, budget);
    (v, spins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    // The state is process-wide: every test takes this lock, so that none sees
    // another's calls, and starts from an average of fast replies (10 µs), so
    // that lone calls spin, unless it resets it itself.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
        let guard = SERIAL.lock().await;
        ROUND_TRIP_NS.store(10_000, Ordering::Relaxed);
        LONE_CALLS.store(1, Ordering::Relaxed);
        guard
    }

    /// A reply that lands after a few polls if the caller keeps polling (spins),
    /// and after 1–2 ms if it polls once and sleeps: spinning pays.
    fn reply_sooner_if_polled() -> impl Future<Output = ()> {
        let mut timer = Box::pin(tokio::time::sleep(Duration::from_millis(1)));
        let mut polls = 0;
        std::future::poll_fn(move |cx| {
            polls += 1;
            if polls > 3 {
                return Poll::Ready(());
            }
            timer.as_mut().poll(cx)
        })
    }

    /// A reply that is `delay` away (tokio's timer: a millisecond at the finest).
    fn reply_in(delay: Duration) -> impl Future<Output = ()> {
        tokio::time::sleep(delay)
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

    /// `calls` lone calls whose round trip is `spinning` when they spin and
    /// `sleeping` when they do not, decided and recorded as `wait` does, without
    /// the waiting (so without the scheduler's noise); how many spun.
    fn simulate(calls: usize, spinning: Duration, sleeping: Duration) -> usize {
        let budget = Duration::from_micros(200);
        let mut spun = 0;
        for _ in 0..calls {
            let (spin, step) = should_spin(budget);
            record(if spin { spinning } else { sleeping }, step, budget);
            spun += usize::from(spin);
        }
        spun
    }

    /// The decision from the average alone: a lone writer spins; one slow reply
    /// does not stop it; a busy daemon (replies past the budget either way) stops
    /// it within a few calls, after which only one call in 256 spins; when the
    /// load goes, a writer whose sleeping round trip sits just above the mark is
    /// brought back to spinning by a probe.
    #[tokio::test]
    async fn spinning_follows_the_round_trips() {
        let _serial = serial().await;
        ROUND_TRIP_NS.store(0, Ordering::Relaxed);
        LONE_CALLS.store(0, Ordering::Relaxed);
        let us = Duration::from_micros;
        // A lone writer: 80 µs spinning, 130 µs sleeping.
        assert_eq!(simulate(1000, us(80), us(130)), 1000);
        // One reply of 5 ms (taken as 400 µs).
        assert_eq!(simulate(1, Duration::from_millis(5), us(130)), 1);
        assert_eq!(simulate(100, us(80), us(130)), 100);
        // Sixteen writers: 420 µs spinning, 450 µs sleeping.
        let first = simulate(10, us(420), us(450));
        assert!((1..10).contains(&first), "{first} of the first 10 spun");
        let spun = simulate(1024, us(420), us(450));
        assert_eq!(spun, 4, "only the probes spin");
        // Alone again, on a slow day: 170 µs sleeping, 80 µs spinning. Sleeping
        // alone would keep the average above the mark; a probe brings it under.
        let spun = simulate(512, us(80), us(170));
        assert!(spun > 200, "{spun} of 512 spun");
        assert_eq!(simulate(100, us(80), us(170)), 100);
    }

    /// One slow reply (a disk hiccup in a lone writer's stream) does not stop
    /// the calls after it from spinning.
    #[tokio::test(flavor = "current_thread")]
    async fn one_slow_reply_does_not_stop_spinning() {
        let _serial = serial().await;
        let budget = Duration::from_micros(200);
        let (_, spins) = wait_counting(reply_in(Duration::from_millis(5)), budget).await;
        assert!(spins > 0);
        assert!(u128::from(ROUND_TRIP_NS.load(Ordering::Relaxed)) < budget.as_nanos() * 3 / 4);
        assert!(wait_counting(reply_sooner_if_polled(), budget).await.1 > 0);
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
