//! Refreshing a published volume: fetch again through the same provider path, swap in a new
//! version if anything changed, keep serving the last good one if the fetch fails.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::manager::Manager;
use super::{Error, PublishRequest};
use crate::provider::Fetched;

/// The first retry after a failed refresh; doubles per failure, capped at the interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Per-volume refresh bookkeeping.
pub(super) struct Schedule {
    pub last_success: Instant,
    pub next_attempt: Instant,
    pub failures: u32,
    /// The failure last logged, so each distinct failure is logged once.
    pub last_error: Option<String>,
    pub rotations: u64,
}

/// A random fraction (0..=`max`) that spreads volumes' refreshes apart.
fn jitter(max: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    max.mul_f64((r % 1024) as f64 / 1024.0)
}

impl Schedule {
    pub fn fetched(interval: Duration) -> Schedule {
        let now = Instant::now();
        Schedule {
            last_success: now,
            next_attempt: now + interval + jitter(interval / 10),
            failures: 0,
            last_error: None,
            rotations: 0,
        }
    }

    fn succeeded(&mut self, interval: Duration) {
        let now = Instant::now();
        self.last_success = now;
        self.next_attempt = now + interval + jitter(interval / 10);
        self.failures = 0;
    }

    fn failed(&mut self, interval: Duration) {
        self.failures = self.failures.saturating_add(1);
        let backoff = FIRST_RETRY
            .saturating_mul(1 << self.failures.min(16).saturating_sub(1))
            .min(interval);
        self.next_attempt = Instant::now() + backoff;
    }
}

/// What a refresh did.
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Same object versions and contents: nothing swapped.
    Unchanged,
    /// A new version is being served.
    Rotated,
    /// The volume was unpublished meanwhile.
    Gone,
}

impl Manager {
    /// Volumes whose next refresh is due.
    pub fn due(&self, now: Instant) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|e| e.schedule.next_attempt <= now)
            .map(|e| e.key().clone())
            .collect()
    }

    /// Re-fetches a volume now and swaps in what changed. On failure the last good version
    /// keeps serving and the next attempt backs off.
    pub async fn refresh(&self, volume_id: &str) -> Result<Refresh, Error> {
        let lock = self.lock_for(volume_id);
        let result = {
            let gate = self.gate.read().await;
            let _serial = lock.lock().await;
            if *gate {
                Err(Error::HandedOver)
            } else {
                self.refresh_locked(volume_id).await
            }
        };
        drop(lock);
        self.forget_lock(volume_id);
        result
    }

    /// A republish of a published volume: remember the newest context and secrets (fresh
    /// tokens), and re-fetch if the last successful fetch is older than the interval. Never
    /// fails: kubelet would tear the volume down.
    pub(super) async fn republish(&self, req: &PublishRequest) {
        let due = match self.volumes.get_mut(&req.volume_id) {
            Some(mut v) => {
                v.context = req.context.clone();
                v.secrets = req.secrets.clone();
                !self.interval.is_zero() && v.schedule.last_success.elapsed() >= self.interval
            }
            None => false,
        };
        if due {
            // Logged and counted by refresh_locked; the old version keeps serving.
            let _ = self.refresh_locked(&req.volume_id).await;
        }
    }

    pub(super) async fn refresh_locked(&self, volume_id: &str) -> Result<Refresh, Error> {
        let started = Instant::now();
        let result = self.fetch_and_swap(volume_id).await;
        let Some(mut v) = self.volumes.get_mut(volume_id) else {
            return Ok(Refresh::Gone);
        };
        let interval = self.interval;
        let m = crate::metrics::get();
        match &result {
            Ok(outcome) => {
                m.refreshed(&v.provider, started.elapsed());
                v.schedule.succeeded(interval);
                if *outcome == Refresh::Rotated {
                    v.schedule.rotations += 1;
                    let versions: Vec<String> = v
                        .mounted
                        .snapshot()
                        .versions()
                        .iter()
                        .map(|o| format!("{}={}", o.id, o.version))
                        .collect();
                    tracing::info!(volume_id, versions = %versions.join(","), ms = started.elapsed().as_secs_f64() * 1e3, "volume rotated");
                }
                if v.schedule.last_error.take().is_some() {
                    tracing::info!(volume_id, "refresh recovered");
                }
            }
            Err(e) => {
                m.refresh_failed(&v.provider, &e.error_type());
                v.schedule.failed(interval);
                // Logged once per outage (and again only if the reason changes), not per retry.
                let reason = e.to_string();
                match v.schedule.last_error.as_deref() {
                    None => {
                        tracing::warn!(volume_id, error = %reason, "refresh failed; serving the last good version")
                    }
                    Some(last) if last != reason => {
                        tracing::info!(volume_id, error = %reason, "refresh still failing, for another reason")
                    }
                    Some(_) => tracing::debug!(volume_id, error = %reason, "refresh still failing"),
                }
                v.schedule.last_error = Some(reason);
            }
        }
        result
    }

    async fn fetch_and_swap(&self, volume_id: &str) -> Result<Refresh, Error> {
        let Some((namespace, class, context, secrets, target, default_mode, mounted)) =
            self.volumes.get(volume_id).map(|v| {
                (
                    v.namespace.clone(),
                    v.class.clone(),
                    v.context.clone(),
                    v.secrets.clone(),
                    v.target.clone(),
                    v.default_mode,
                    Arc::clone(&v.mounted),
                )
            })
        else {
            return Ok(Refresh::Gone);
        };
        let current = mounted.snapshot();
        let class = self.classes().lookup(&namespace, &class).await?;
        let call = Self::mount_call(
            &class,
            &context,
            &secrets,
            &target,
            default_mode,
            Some(&current),
        );
        let next = match self.provider().refresh(call).await? {
            Fetched::Unchanged => return Ok(Refresh::Unchanged),
            Fetched::New(next) => Arc::new(next),
        };
        tokio::task::spawn_blocking(move || mounted.swap(next))
            .await
            .map_err(|e| Error::Internal(format!("swap task: {e}")))??;
        self.notify_saved(volume_id);
        self.report_mounted(volume_id);
        Ok(Refresh::Rotated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_up_to_the_interval() {
        let interval = Duration::from_secs(10);
        let mut s = Schedule::fetched(interval);
        let after = |s: &Schedule| s.next_attempt.saturating_duration_since(Instant::now());
        assert!(after(&s) > Duration::from_secs(9) && after(&s) <= Duration::from_secs(11));
        let mut last = Duration::ZERO;
        for _ in 0..8 {
            s.failed(interval);
            let wait = after(&s);
            assert!(wait >= last.saturating_sub(Duration::from_millis(50)) && wait <= interval);
            last = wait;
        }
        assert!(
            last > Duration::from_secs(9),
            "backoff should reach the interval"
        );
        s.succeeded(interval);
        assert_eq!(s.failures, 0);
    }
}
