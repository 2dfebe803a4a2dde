//! What an outside observer sees of a process, for `benches/daemon.rs`: a server's
//! whole-process CPU and context switches from `/proc/<pid>`, a load generator's
//! from the `rusage` the kernel hands back when that one child is reaped
//! (`wait4`), and two CPU hogs for the busy-host rows. Nothing here asks the
//! measured program how much it spent.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};

/// utime + stime of every thread of a process, live or exited, in seconds
/// (`/proc/<pid>/stat`, fields 14 and 15; the kernel scales the tick samples to
/// the scheduler's exact runtime).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; count fields after its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.get(11)
        .zip(f.get(12))
        .map_or(0.0, |(u, s)| (u + s) as f64 / hz)
}

/// Voluntary and involuntary context switches summed over the live threads of
/// `pid` (`/proc/<pid>/task/*/status`).
pub fn context_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let field = |st: &str, name: &str| {
        st.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .fold((0, 0), |(v, n), st| {
            (
                v + field(&st, "voluntary_ctxt_switches:"),
                n + field(&st, "nonvoluntary_ctxt_switches:"),
            )
        })
}

/// A server's CPU and context switches at one moment.
#[derive(Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub vcs: u64,
    pub ivcs: u64,
}

impl ProcSample {
    pub fn of(pid: u32) -> ProcSample {
        let (vcs, ivcs) = context_switches(pid);
        ProcSample {
            cpu_s: cpu_seconds(pid),
            vcs,
            ivcs,
        }
    }

    /// What was spent between `self` and the later sample `after`.
    pub fn until(self, after: ProcSample) -> ProcSample {
        ProcSample {
            cpu_s: after.cpu_s - self.cpu_s,
            vcs: after.vcs.saturating_sub(self.vcs),
            ivcs: after.ivcs.saturating_sub(self.ivcs),
        }
    }
}

/// A load generator's run: what it printed and what it cost.
pub struct ChildRun {
    pub stdout: String,
    pub success: bool,
    /// Its own CPU (user + system), all threads, from `wait4`'s rusage.
    pub cost: ProcSample,
}

/// Run `cmd` to its end and reap that one child with `wait4`, so that its rusage
/// is its own (not every child this process ever reaped, hogs included).
// Reaped by `wait4` below, not by `Child::wait`, which clippy looks for.
#[allow(clippy::zombie_processes)]
pub fn run_measured(cmd: &mut Command) -> ChildRun {
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("the load generator's output is text");
    let mut status = 0;
    // SAFETY: wait4(2) on our own child, with a status and rusage it fills.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut u) };
    assert_eq!(
        r,
        child.id() as i32,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    ChildRun {
        stdout,
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        cost: ProcSample {
            cpu_s: secs(u.ru_utime) + secs(u.ru_stime),
            vcs: u.ru_nvcsw as u64,
            ivcs: u.ru_nivcsw as u64,
        },
    }
}

/// Two CPU-bound processes at our priority, as a database busy beside its
/// sidecar: started by [`Hogs::start`], killed and reaped on drop.
pub struct Hogs(Vec<Child>);

impl Hogs {
    pub fn start(n: usize) -> Hogs {
        Hogs(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdin(Stdio::null())
                        .spawn()
                        .expect("sh runs")
                })
                .collect(),
        )
    }

    /// CPU the hogs got so far, in seconds (to show that they did run).
    pub fn cpu_seconds(&self) -> f64 {
        self.0.iter().map(|c| cpu_seconds(c.id())).sum()
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
