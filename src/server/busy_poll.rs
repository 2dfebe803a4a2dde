//! Busy polling while the daemon serves a lone writer (`busy_poll` in the config).
//!
//! One writer reserving back to back waits, per reservation, for a flush and for
//! several thread wake-ups: its request waking the daemon, the disk's completion,
//! the reply waking the writer. On a VM whose guest halts an idle vCPU at once
//! (the benchmark VM's kernel line has `haltpoll.guest_halt_poll_ns=0`), each wake-up
//! of a thread asleep on the other vCPU goes through the hypervisor, and together
//! they cost about as much as the flush itself (docs/performance.md, "Busy
//! polling"). So while the engine reports a lone writer, a task keeps the runtime's
//! thread awake for up to `busy_poll` after each request starts and ends: it yields
//! to the runtime, which then checks its sockets without blocking and runs every
//! ready task, and to the kernel (`sched_yield`), so that the flushing thread or
//! any other process waiting for this CPU runs first. The next request is then read
//! as it lands instead of after a wake-up.
//!
//! As soon as commits overlap the engine stops reporting a lone writer and the task
//! sleeps: under concurrent load the runtime is rarely idle, and a spinning thread
//! would only take CPU from the requests and the flushes (measured: 16 clients
//! lost 6-18 % when it spun regardless). Idle, it costs nothing: it spins only after a request.
//!
//! Invariant protected: none of the id invariants (it changes when the runtime
//! looks for work, not what any request does). What it must not do, and the
//! tests check: spin without a lone writer, spin past its budget, or outlive
//! shutdown. CPU time spent spinning is counted in
//! `idalloc_busy_poll_seconds` (a histogram: its `_sum` is the time spent).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Whether spinning can pay now: the engine's "one writer at a time" signal.
pub type Gate = Box<dyn Fn() -> bool + Send + Sync>;

/// Shared by the connections (which [`touch`](BusyPoll::touch) it) and the task
/// that spins ([`BusyPoll::run`]).
pub struct BusyPoll {
    budget: Duration,
    gate: Gate,
    epoch: Instant,
    /// Nanoseconds from `epoch` to the last request start or end.
    last_touch: AtomicU64,
    spinning: AtomicBool,
    wake: Notify,
    /// Nanoseconds spent spinning, for the metric and the tests.
    spun_ns: AtomicU64,
}

impl BusyPoll {
    /// Spin for up to `budget` after each request while `gate` holds. A zero budget
    /// turns busy polling off: [`touch`](BusyPoll::touch) is then one comparison.
    pub fn new(budget: Duration, gate: Gate) -> Arc<BusyPoll> {
        Arc::new(BusyPoll {
            budget,
            gate,
            epoch: Instant::now(),
            last_touch: AtomicU64::new(0),
            spinning: AtomicBool::new(false),
            wake: Notify::new(),
            spun_ns: AtomicU64::new(0),
        })
    }

    /// Busy polling off (for callers that serve without an engine, such as tests).
    pub fn off() -> Arc<BusyPoll> {
        BusyPoll::new(Duration::ZERO, Box::new(|| false))
    }

    /// Whether a budget is configured at all.
    pub fn enabled(&self) -> bool {
        !self.budget.is_zero()
    }

    /// A request started or ended: keep the runtime awake for another budget.
    pub fn touch(&self) {
        // Without a lone writer nothing spins, and a spinner still running stops
        // at its next look at the gate: the touch is not needed, and skipping it
        // saves a clock read per request start and end under concurrent load.
        if !self.enabled() || !(self.gate)() {
            return;
        }
        // SeqCst here and in `run`: each side stores one flag and then loads the
        // other's, and only a total order guarantees that one of them sees the
        // other's store (else a touch could go unnoticed by a spinner stopping).
        self.last_touch.store(self.now_ns(), Ordering::SeqCst);
        // Waking the task costs a wake-up of its own; only when it is not spinning.
        if !self.spinning.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Time spent spinning so far.
    pub fn spun(&self) -> Duration {
        Duration::from_nanos(self.spun_ns.load(Ordering::Relaxed))
    }

    /// The spinning task: sleeps until touched, spins while the gate holds and the
    /// last touch is less than a budget ago, and returns when `stop` is cancelled.
    pub async fn run(self: Arc<BusyPoll>, stop: CancellationToken) {
        if !self.enabled() {
            return;
        }
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            self.spinning.store(true, Ordering::SeqCst);
            let started = Instant::now();
            loop {
                while self.should_spin(&stop) {
                    std::thread::yield_now();
                    tokio::task::yield_now().await;
                }
                self.spinning.store(false, Ordering::SeqCst);
                // A touch that saw `spinning` still set did not notify: look again
                // now that it is clear, so that touch is not lost.
                if !self.should_spin(&stop) {
                    break;
                }
                self.spinning.store(true, Ordering::SeqCst);
            }
            let spun = started.elapsed();
            self.spun_ns
                .fetch_add(spun.as_nanos() as u64, Ordering::Relaxed);
            metrics::histogram!("idalloc_busy_poll_seconds").record(spun.as_secs_f64());
        }
    }

    fn should_spin(&self, stop: &CancellationToken) -> bool {
        let since = self
            .now_ns()
            .saturating_sub(self.last_touch.load(Ordering::SeqCst));
        since < self.budget.as_nanos() as u64 && (self.gate)() && !stop.is_cancelled()
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A poller with its spinning task running, and a gate the test opens and
    /// closes.
    struct Running {
        busy: Arc<BusyPoll>,
        open: Arc<AtomicBool>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        async fn start(budget: Duration, open: bool) -> Running {
            let open = Arc::new(AtomicBool::new(open));
            let gate = open.clone();
            let busy = BusyPoll::new(budget, Box::new(move || gate.load(Ordering::Acquire)));
            let stop = CancellationToken::new();
            let task = tokio::spawn(busy.clone().run(stop.clone()));
            // Let the task reach its wait, so the first touch finds it there.
            tokio::task::yield_now().await;
            Running {
                busy,
                open,
                stop,
                task,
            }
        }

        fn spinning(&self) -> bool {
            self.busy.spinning.load(Ordering::Acquire)
        }

        /// Stop the task; it must return promptly.
        async fn finish(self) {
            self.stop.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("the spinning task returns on shutdown")
                .unwrap();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_touch_spins_for_about_the_budget_while_the_gate_holds() {
        let r = Running::start(Duration::from_millis(20), true).await;
        r.busy.touch();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let spun = r.busy.spun();
        assert!(spun >= Duration::from_millis(15), "spun {spun:?}");
        assert!(spun < Duration::from_millis(140), "spun {spun:?}");
        assert!(!r.spinning());
        r.finish().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_spinning_without_a_lone_writer() {
        let r = Running::start(Duration::from_millis(20), false).await;
        for _ in 0..10 {
            r.busy.touch();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        assert_eq!(r.busy.spun(), Duration::ZERO);
        r.finish().await;
    }

    /// Concurrent load shows up as the gate closing: the spin ends then, not at
    /// the end of a (here very long) budget.
    #[tokio::test(flavor = "current_thread")]
    async fn spinning_stops_when_the_gate_closes() {
        let r = Running::start(Duration::from_secs(60), true).await;
        r.busy.touch();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(r.spinning());
        r.open.store(false, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!r.spinning());
        assert!(r.busy.spun() < Duration::from_secs(1));
        r.finish().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_ends_a_spin() {
        let r = Running::start(Duration::from_secs(60), true).await;
        r.busy.touch();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(r.spinning());
        r.finish().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn off_is_inert() {
        let busy = BusyPoll::off();
        assert!(!busy.enabled());
        busy.touch();
        // Returns at once, without waiting for the (never cancelled) token.
        tokio::time::timeout(
            Duration::from_secs(5),
            busy.clone().run(CancellationToken::new()),
        )
        .await
        .unwrap();
        assert_eq!(busy.spun(), Duration::ZERO);
    }
}
