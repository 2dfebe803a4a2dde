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
//! So a call spins only where spinning pays: the process keeps two moving averages
//! of its lone calls' round trips, one for calls that spun and one for calls that
//! slept, and a lone call spins while the first is under the budget and at least
//! an eighth below the second. One lone call in [`PROBE_EVERY`] goes the other way,
//! so that both averages follow a change of load. A lone writer's round trip is
//! about halved by spinning (the wake-ups it saves are most of it), well within the
//! budget, and it keeps spinning. When the daemon or the machine is busy with other
//! writers, replies take longer than the budget (a spinning call then sleeps in
//! the end anyway) or no less than a sleeping call's, and calls sleep again.
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

/// Moving averages of this process's lone round trips (polling clients, outside
/// [`quiet`]) in nanoseconds, for calls that spun and for calls that slept; 0 = no
/// call yet. Plain loads and stores: a lost update among racing calls only delays
/// an average a little, and they steer nothing but whether to spin.
static SPUN_NS: AtomicU64 = AtomicU64::new(0);
static SLEPT_NS: AtomicU64 = AtomicU64::new(0);

/// Lone calls so far, to pick the probes.
static LONE_CALLS: AtomicU64 = AtomicU64::new(0);

/// One lone call in this many does what the averages advise against, to keep the
/// other average current. Rare enough to stay out of the p99: a probe that spins
/// on a machine busy with other writers yields its CPU to them and may be slow.
const PROBE_EVERY: u64 = 256;

/// How far one call moves an average, as a shift: a quarter of the way for the
/// calls of the current choice, half for a probe (they are few, and a change of
/// load should show within a few of them).
const STEP: u32 = 2;
const PROBE_STEP: u32 = 1;

/// Whether this lone call should spin for up to `budget` (and count it), and how
/// far its round trip moves its average.
fn should_spin(budget: Duration) -> (bool, u32) {
    let n = LONE_CALLS.fetch_add(1, Ordering::Relaxed);
    let spun = SPUN_NS.load(Ordering::Relaxed);
    let slept = SLEPT_NS.load(Ordering::Relaxed);
    if slept == 0 {
        // Learn what a sleeping call costs first, then what a spinning one does.
        return (false, STEP);
    }
    if spun == 0 {
        return (true, STEP);
    }
    // Spinning pays if it is faster, and if replies come within the budget: past
    // it a spinning call sleeps anyway, and under load it only took CPU from the
    // writers and the daemon (each process's spinning calls may be faster than its
    // sleeping ones, while the other processes' calls get slower).
    let pays = spun < slept - slept / 8 && u128::from(spun) < budget.as_nanos();
    if n % PROBE_EVERY == 0 {
        (!pays, PROBE_STEP)
    } else {
        (pays, STEP)
    }
}

/// Move `average` `1 / 2^step` of the way to one round trip.
fn record(average: &AtomicU64, round_trip: Duration, step: u32) {
    let sample = u64::try_from(round_trip.as_nanos()).unwrap_or(u64::MAX);
    let old = average.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        old - (old >> step) + (sample >> step)
    };
    average.store(new.max(1), Ordering::Relaxed);
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
    if !alone {
        return (reply.await, 0);
    }
    let (spin, step) = should_spin(budget);
    if !spin {
        let v = reply.await;
        record(&SLEPT_NS, started.elapsed(), step);
        return (v, 0);
    }
    let until = started + budget;
    let mut spins = 0;
    loop {
        if let Poll::Ready(v) =
            std::future::poll_fn(|cx| Poll::Ready(reply.as_mut().poll(cx))).await
        {
            record(&SPUN_NS, started.elapsed(), step);
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
    record(&SPUN_NS, started.elapsed(), step);
    (v, spins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    // The state is process-wide: every test takes this lock, so that none sees
    // another's calls, and starts from averages that say spinning pays (and no
    // probe due), unless it resets them itself.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
        let guard = SERIAL.lock().await;
        SPUN_NS.store(10_000, Ordering::Relaxed);
        SLEPT_NS.store(1_000_000, Ordering::Relaxed);
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

    /// How many of `calls` lone calls spun, each waiting for `reply()`.
    async fn spinning_calls<F: Future>(calls: usize, reply: impl Fn() -> F) -> usize {
        let mut spun = 0;
        for _ in 0..calls {
            if wait_counting(reply(), Duration::from_micros(200)).await.1 > 0 {
                spun += 1;
            }
        }
        spun
    }

    /// From nothing known, a process learns both round trips and spins where that
    /// is faster; when replies stop coming sooner for it (a busy daemon: they take
    /// 2 ms either way), calls go back to sleeping within a few calls; when
    /// spinning pays again, the probes notice and calls spin again.
    #[tokio::test(flavor = "current_thread")]
    async fn calls_spin_only_while_it_pays() {
        let _serial = serial().await;
        SPUN_NS.store(0, Ordering::Relaxed);
        SLEPT_NS.store(0, Ordering::Relaxed);
        LONE_CALLS.store(0, Ordering::Relaxed);
        // The first call sleeps, the second spins; then one in 256 sleeps (a probe).
        assert_eq!(spinning_calls(1, reply_sooner_if_polled).await, 0);
        assert_eq!(spinning_calls(1, reply_sooner_if_polled).await, 1);
        let spun = spinning_calls(100, reply_sooner_if_polled).await;
        assert!(spun >= 95, "{spun} of 100 calls spun where spinning pays");
        // Past the budget either way (1–2 ms: tokio's timer). A few calls pull
        // the spinning average up, then only a probe now and then spins.
        let slow = || reply_in(Duration::from_millis(1));
        let spun = spinning_calls(300, slow).await;
        assert!(spun <= 20, "{spun} of 300 calls spun where it does not pay");
        assert!(SPUN_NS.load(Ordering::Relaxed) >= 500_000);
        // Spinning pays again: within a few probes calls spin again.
        let spun = spinning_calls(1500, reply_sooner_if_polled).await;
        assert!(spun >= 300, "{spun} of 1500 calls spun once it paid again");
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
