//! Histories dropped whole, freed a slice at a time off the caller's path.
//!
//! A topic's history is dropped whole when a copy of a replicated topic is
//! given up (its last local subscriber left) or restarted, and when a
//! finished stream's grace period is over. Freeing a message touches
//! memory long cold in cache, so when many topics go at once (a thousand
//! clients disconnecting together) freeing in place would hold the thread
//! for tens of milliseconds while every other connection on it waits. Here
//! one task frees them a slice at a time, a slice per millisecond; a
//! slice per turn while a large backlog waits, so that dropped histories
//! cannot pile up faster than they are freed. Batches too small to
//! matter, and any dropped without a Tokio runtime, are freed in place.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lock::lock;

/// Items freed per turn of the reclaiming task.
const SLICE: usize = 64;

/// Items waiting beyond which the task frees a slice every turn.
const BACKLOG: usize = 1 << 16;
/// Below [`BACKLOG`], the time between slices.
const PACE: Duration = Duration::from_millis(1);

/// Batches of items waiting to be freed, and whether a task frees them.
pub(crate) struct Reclaim<T> {
    pending: Mutex<Pending<T>>,
}

struct Pending<T> {
    batches: Vec<VecDeque<T>>,
    /// Items in `batches`.
    waiting: usize,
    /// A task is freeing them: set when one is spawned, cleared by it when
    /// it finds nothing left, both under this lock, so no batch is left
    /// without one.
    freeing: bool,
}

impl<T: Send + 'static> Reclaim<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Pending {
                batches: Vec::new(),
                waiting: 0,
                freeing: false,
            }),
        })
    }

    /// Frees `batch`: now if it is small or there is no runtime to free it
    /// later, else from the reclaiming task.
    pub(crate) fn free(self: &Arc<Self>, batch: VecDeque<T>) {
        if batch.len() <= SLICE {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let start = {
            let mut pending = lock(&self.pending);
            pending.waiting += batch.len();
            pending.batches.push(batch);
            !std::mem::replace(&mut pending.freeing, true)
        };
        // Outside the lock: a runtime that is shutting down drops the task
        // at once, and its guard takes the lock.
        if start {
            runtime.spawn(Arc::clone(self).run());
        }
    }

    /// The reclaiming task. Its guard is made before it first runs: a
    /// runtime that shuts down drops tasks that never ran, too.
    fn run(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send {
        let mut guard = Freeing {
            reclaim: self,
            finished: false,
        };
        async move {
            loop {
                let (slice, waiting) = {
                    let mut pending = lock(&guard.reclaim.pending);
                    let Some(batch) = pending.batches.last_mut() else {
                        // Under the lock that `free` checks it with.
                        pending.freeing = false;
                        drop(pending);
                        guard.finish();
                        return;
                    };
                    let slice: Vec<T> = batch.drain(..batch.len().min(SLICE)).collect();
                    if batch.is_empty() {
                        pending.batches.pop();
                    }
                    pending.waiting -= slice.len();
                    (slice, pending.waiting)
                };
                // Freed outside the lock, so that handing a batch over never
                // waits for a slice to be freed.
                drop(slice);
                if waiting > BACKLOG {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(PACE).await;
                }
            }
        }
    }

    /// Items waiting to be freed.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock(&self.pending).waiting
    }
}

/// Clears `freeing` if the task is dropped before it finished (its
/// runtime shut down), so that the next batch starts another task.
struct Freeing<T> {
    reclaim: Arc<Reclaim<T>>,
    finished: bool,
}

impl<T> Freeing<T> {
    /// The task found nothing left and cleared `freeing` itself.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl<T> Drop for Freeing<T> {
    fn drop(&mut self) {
        if !self.finished {
            lock(&self.reclaim.pending).freeing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits, a pace at a time (at most 100), until `item` is the last
    /// reference to itself: every copy handed over was freed.
    async fn freed(item: &Arc<()>) {
        for _ in 0..100 {
            if Arc::strong_count(item) == 1 {
                break;
            }
            tokio::time::sleep(PACE).await;
        }
        assert_eq!(Arc::strong_count(item), 1);
    }

    #[test]
    fn small_batches_and_batches_without_a_runtime_are_freed_at_once() {
        let reclaim = Reclaim::new();
        let item = Arc::new(());
        reclaim.free(vec![item.clone(); SLICE].into());
        assert_eq!(Arc::strong_count(&item), 1);
        reclaim.free(vec![item.clone(); 10 * SLICE].into());
        assert_eq!(Arc::strong_count(&item), 1);
        assert_eq!(reclaim.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn large_batches_are_freed_by_a_paced_task() {
        let reclaim = Reclaim::new();
        let item = Arc::new(());
        reclaim.free(vec![item.clone(); 3 * SLICE].into());
        reclaim.free(vec![item.clone(); SLICE + 1].into());
        // Nothing is freed by the caller.
        assert_eq!(Arc::strong_count(&item), 1 + 4 * SLICE + 1);
        let mut paces = 0;
        while reclaim.waiting() > 0 && paces < 100 {
            tokio::time::sleep(PACE).await;
            paces += 1;
        }
        assert_eq!(Arc::strong_count(&item), 1);
        // Five slices, a pace apart.
        assert!(paces >= 4, "{paces}");
        // A later batch gets a task again.
        reclaim.free(vec![item.clone(); 2 * SLICE].into());
        freed(&item).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_freed_without_pacing() {
        let reclaim = Reclaim::new();
        let item = Arc::new(());
        let start = tokio::time::Instant::now();
        reclaim.free(vec![item.clone(); BACKLOG + 8 * SLICE].into());
        for _ in 0..1000 {
            if reclaim.waiting() <= BACKLOG {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(reclaim.waiting() <= BACKLOG);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn a_task_dropped_with_its_runtime_leaves_the_next_batch_a_task() {
        let reclaim = Reclaim::new();
        let item = Arc::new(());
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        first.block_on(async { reclaim.free(vec![item.clone(); 4 * SLICE].into()) });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        second.block_on(async {
            reclaim.free(vec![item.clone(); 2 * SLICE].into());
            freed(&item).await;
        });
    }
}
