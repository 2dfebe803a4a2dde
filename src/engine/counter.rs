//! One counter's in-memory state (`granted` and the lease it draws from) and the
//! arithmetic of taking ids out of it.
//!
//! Invariants protected: *unique* (1) and *ordered per daemon* (6). `granted` only
//! moves up; ids are taken only from `[granted, lease_end)` or from a prefetched
//! lease that lies wholly above it, so two takes never overlap and each starts at or
//! above the end of the one before. Overflow of `u64` is an error, never a wrap.

use serde::{Deserialize, Serialize};

use idalloc_client::protocol::IdRange;

/// A counter as it is kept in memory and in sled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// The next id to hand out.
    pub granted: u64,
    /// Where the lease we are drawing from started (for `status`).
    pub lease_start: u64,
    /// End (exclusive) of the lease we are drawing from.
    pub lease_end: u64,
    /// A lease taken ahead of need that does not continue the current one.
    pub next: Option<(u64, u64)>,
}

/// Why ids could not be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum TakeError {
    /// Not enough ids left in the leases we own: take a new lease.
    NeedLease,
    /// `granted + count` would not fit in `u64`.
    Overflow,
}

impl Counter {
    /// A counter resuming at `at` with no lease: the next reservation takes one.
    pub fn resume_at(at: u64) -> Self {
        Counter {
            granted: at,
            lease_start: at,
            lease_end: at,
            next: None,
        }
    }

    /// Take `count` ids (`count >= 1`).
    pub fn take(&mut self, count: u64) -> Result<IdRange, TakeError> {
        let end = self.granted.checked_add(count).ok_or(TakeError::Overflow)?;
        if end <= self.lease_end {
            let r = IdRange {
                start: self.granted,
                end,
            };
            self.granted = end;
            return Ok(r);
        }
        // The current lease is too short; a prefetched lease that can hold the whole
        // range replaces it. What was left of the current lease becomes a gap.
        if let Some((s, e)) = self.next {
            if s.checked_add(count).is_some_and(|x| x <= e) {
                debug_assert!(s >= self.lease_end);
                self.next = None;
                self.lease_start = s;
                self.lease_end = e;
                self.granted = s;
                return self.take(count);
            }
        }
        Err(TakeError::NeedLease)
    }

    /// Ids this counter can still hand out without a new lease.
    pub fn headroom(&self) -> u64 {
        let cur = self.lease_end.saturating_sub(self.granted);
        cur + self.next.map_or(0, |(s, e)| e - s)
    }

    /// Whether `count` ids can be taken without a new lease.
    pub fn can_take(&self, count: u64) -> bool {
        let mut probe = *self;
        probe.take(count).is_ok()
    }

    /// The end of the highest lease we own (the ceiling we last wrote or adopted).
    pub fn owned_end(&self) -> u64 {
        self.next
            .map_or(self.lease_end, |(_, e)| e.max(self.lease_end))
    }

    /// Install a lease `[start, end)` just won from the store. A lease that continues
    /// ours extends it (dense ids); one above it is kept for when ours runs out.
    pub fn install(&mut self, start: u64, end: u64) {
        debug_assert!(start >= self.owned_end() && end > start);
        if self.next.is_none() && start == self.lease_end {
            self.lease_end = end;
        } else if self.granted == self.lease_end && self.next.is_none() {
            // Nothing left in the current lease: jump now.
            self.lease_start = start;
            self.lease_end = end;
            self.granted = start;
        } else if let Some((s, e)) = self.next {
            // Two prefetched leases cannot happen (one lease call at a time per
            // namespace, and it is skipped while `next` is set), but if the new one
            // continues the parked one, merge rather than drop ids.
            if start == e {
                self.next = Some((s, end));
            } else {
                self.next = Some((start, end));
            }
        } else {
            self.next = Some((start, end));
        }
    }

    /// The lowest ceiling this counter may give back to (DESIGN rule 9), if it has
    /// anything to give back: every id in `[point, owned_end)` lies in our own leases
    /// and was never granted. A prefetched lease taken above somebody else's lease
    /// is not contiguous with the current one (the ids between belong to them), so
    /// then only the prefetched lease itself can be given back.
    pub fn give_back_point(&self) -> Option<u64> {
        let point = match self.next {
            Some((s, _)) if s > self.lease_end => s,
            // `install` merges a prefetched lease that continues the current one,
            // so this arm only sees a contiguous pair if that ever changes.
            Some(_) => self.granted,
            None => self.granted,
        };
        (point < self.owned_end()).then_some(point)
    }

    /// Give back every id at or above `point` (from [`Counter::give_back_point`]).
    pub fn release_from(&mut self, point: u64) {
        debug_assert!(point >= self.granted);
        // A point inside the parked lease would keep that lease while the ceiling
        // drops below its end: only `give_back_point`'s points are valid.
        debug_assert!(self.next.is_none_or(|(s, e)| point <= s || point >= e));
        if let Some((s, _)) = self.next {
            if point <= s {
                self.next = None;
            }
        }
        if point < self.lease_end {
            self.lease_end = point;
        }
    }

    /// Never grant below `at` again, keeping what is left of our leases above it
    /// (a fork's ids up to `at` were merged into this namespace).
    pub fn skip_to(&mut self, at: u64) {
        if self.granted >= at {
            return;
        }
        if at <= self.lease_end {
            self.granted = at;
            return;
        }
        match self.next {
            Some((s, e)) if at < e => {
                self.lease_start = s.max(at);
                self.lease_end = e;
                self.granted = s.max(at);
                self.next = None;
            }
            _ => *self = Counter::resume_at(at.max(self.owned_end())),
        }
    }

    /// Move up to at least `at` with no lease (the ceiling moved under us, or local
    /// state cannot be trusted). Never moves down.
    pub fn jump_to(&mut self, at: u64) {
        let at = at.max(self.granted).max(self.owned_end());
        *self = Counter::resume_at(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_to_keeps_the_lease_above_the_point_and_never_moves_down() {
        let mut c = Counter::resume_at(100);
        c.install(100, 200);
        c.take(10).unwrap();
        c.skip_to(50);
        assert_eq!(c.granted, 110, "never down");
        c.skip_to(150);
        assert_eq!((c.granted, c.lease_end), (150, 200), "inside the lease");
        c.install(300, 400);
        c.skip_to(320);
        assert_eq!(
            (c.granted, c.lease_start, c.lease_end, c.next),
            (320, 320, 400, None)
        );
        c.skip_to(1000);
        assert_eq!(c.take(1).unwrap_err(), TakeError::NeedLease);
        assert_eq!(c.granted, 1000);
    }

    #[test]
    fn takes_are_increasing_and_disjoint_across_leases() {
        let mut c = Counter::resume_at(100);
        assert_eq!(c.take(1), Err(TakeError::NeedLease));
        c.install(100, 110);
        assert_eq!(
            c.take(4).unwrap(),
            IdRange {
                start: 100,
                end: 104
            }
        );
        c.install(200, 210);
        // Does not fit in the rest of the current lease: jumps to the parked one.
        assert_eq!(
            c.take(8).unwrap(),
            IdRange {
                start: 200,
                end: 208
            }
        );
        assert_eq!(c.take(3), Err(TakeError::NeedLease));
        c.install(210, 220);
        assert_eq!(
            c.take(3).unwrap(),
            IdRange {
                start: 208,
                end: 211
            }
        );
    }

    #[test]
    fn overflow_is_an_error() {
        let mut c = Counter::resume_at(u64::MAX - 1);
        c.install(u64::MAX - 1, u64::MAX);
        assert_eq!(c.take(2), Err(TakeError::Overflow));
        assert_eq!(
            c.take(1).unwrap(),
            IdRange {
                start: u64::MAX - 1,
                end: u64::MAX
            }
        );
    }

    #[test]
    fn a_prefetched_lease_above_a_gap_is_all_that_can_be_given_back() {
        // Ours: [0,10) with 6 granted; [10,20) is another daemon's; ours again: [20,30).
        let mut c = Counter::resume_at(0);
        c.install(0, 10);
        c.take(6).unwrap();
        c.install(20, 30);
        assert_eq!(c.give_back_point(), Some(20));
        c.release_from(20);
        assert_eq!(c.owned_end(), 10);
        // Without a parked lease the rest of the current one goes back.
        assert_eq!(c.give_back_point(), Some(6));
        c.release_from(6);
        assert_eq!(
            (c.granted, c.owned_end(), c.give_back_point()),
            (6, 6, None)
        );
    }

    #[test]
    fn jump_never_moves_down() {
        let mut c = Counter::resume_at(50);
        c.install(50, 80);
        c.jump_to(10);
        assert_eq!(c.granted, 80);
        c.jump_to(500);
        assert_eq!(c, Counter::resume_at(500));
    }
}
