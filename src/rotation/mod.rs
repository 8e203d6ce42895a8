//! The background task that refreshes published volumes every rotation interval, with
//! jitter (from the volume's schedule) and a bound on concurrent provider calls. It reuses the
//! publish path (`Manager::refresh`: class → provider → secret memory → swap).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::volume::Manager;

/// Starts the task; `None` when `interval` is zero (rotation off).
pub fn spawn(
    manager: Arc<Manager>,
    interval: Duration,
    max_concurrent: usize,
) -> Option<JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    // Wake often enough that a refresh starts within a quarter interval of being due.
    let tick = (interval / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let permits = Arc::new(Semaphore::new(max_concurrent.max(1)));
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    tracing::info!(?interval, max_concurrent, "rotation started");
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            for id in manager.due(Instant::now()) {
                let fresh = in_flight
                    .lock()
                    .map(|mut set| set.insert(id.clone()))
                    .unwrap_or(false);
                if !fresh {
                    continue; // still refreshing from an earlier tick
                }
                let (manager, permits, in_flight) = (
                    Arc::clone(&manager),
                    Arc::clone(&permits),
                    Arc::clone(&in_flight),
                );
                tokio::spawn(async move {
                    if let Ok(_permit) = permits.acquire().await {
                        // Outcomes and failures are logged by the manager.
                        let _ = manager.refresh(&id).await;
                    }
                    if let Ok(mut set) = in_flight.lock() {
                        set.remove(&id);
                    }
                });
            }
        }
    }))
}
