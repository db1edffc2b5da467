//! Locking the crate's mutexes.
//!
//! No code in the crate panics while holding one of its locks, and every
//! state they guard is consistent between statements, so a poisoned lock
//! (a panic elsewhere on that thread) is still safe to use: ignoring the
//! poison keeps one panic from spreading to every connection.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
