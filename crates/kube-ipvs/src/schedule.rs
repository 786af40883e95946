//! When the loop syncs and checks: a sync at most every `minSyncPeriod`, so that a burst of
//! changes is one sync; after a failed sync, a pause before the retry; and a full check every
//! `syncPeriod` after the last one ended.

use std::time::Duration;

use tokio::time::Instant;

/// After a failed sync, the next one waits at least this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The loop's next sync and next full check.
#[derive(Debug, Clone)]
pub struct Schedule {
    min_sync_period: Duration,
    sync_period: Duration,
    next_sync: Instant,
    next_check: Instant,
}

impl Schedule {
    /// Starting `now`: the first sync may run at once, the first check a `sync_period` later.
    pub fn new(min_sync_period: Duration, sync_period: Duration, now: Instant) -> Self {
        Self { min_sync_period, sync_period, next_sync: now, next_check: now + sync_period }
    }

    /// When the next sync may run (if a change waits).
    pub fn next_sync(&self) -> Instant {
        self.next_sync
    }

    /// When the next full check is due.
    pub fn next_check(&self) -> Instant {
        self.next_check
    }

    /// A sync ended at `now`, successfully or not: changes arriving meanwhile wait for the
    /// minimum period, and a failure waits for [`RETRY_AFTER`] at least.
    pub fn synced(&mut self, succeeded: bool, now: Instant) {
        let retry = if succeeded { Duration::ZERO } else { RETRY_AFTER };
        self.next_sync = now + self.min_sync_period.max(retry);
    }

    /// A full check ended at `now` (or had nothing to check yet).
    pub fn checked(&mut self, now: Instant) {
        self.next_check = now + self.sync_period;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn syncs_wait_for_the_minimum_period_and_failures_for_the_retry() {
        let start = Instant::now();
        let mut schedule = Schedule::new(Duration::ZERO, 30 * SECOND, start);
        assert_eq!(schedule.next_sync(), start, "the first sync runs at once");
        schedule.synced(true, start);
        assert_eq!(schedule.next_sync(), start, "no minimum: every change is synced at once");
        schedule.synced(false, start);
        assert_eq!(schedule.next_sync(), start + RETRY_AFTER);

        let mut schedule = Schedule::new(2 * SECOND, 30 * SECOND, start);
        schedule.synced(true, start + SECOND);
        assert_eq!(schedule.next_sync(), start + 3 * SECOND);
        schedule.synced(false, start + 3 * SECOND);
        assert_eq!(schedule.next_sync(), start + 5 * SECOND, "the longer of the two");
    }

    #[test]
    fn a_check_is_due_a_sync_period_after_the_last_one_ended() {
        let start = Instant::now();
        let mut schedule = Schedule::new(SECOND, 30 * SECOND, start);
        assert_eq!(schedule.next_check(), start + 30 * SECOND);
        // A long check: the next period starts when it ends.
        schedule.checked(start + 45 * SECOND);
        assert_eq!(schedule.next_check(), start + 75 * SECOND);
        schedule.synced(true, start + 46 * SECOND);
        assert_eq!(schedule.next_check(), start + 75 * SECOND, "syncs do not move checks");
    }
}
