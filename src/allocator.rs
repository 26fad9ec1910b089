//! How weft uses the C allocator (glibc's malloc).
//!
//! By default glibc gives large freed blocks straight back to the kernel: blocks above the
//! mmap threshold are unmapped, and free memory at the top of the heap is trimmed. A busy
//! tunnel frees and allocates its relay and TLS buffers for every chunk it moves, so each one
//! was unmapped and faulted in again: a fifth of a node's CPU under a bulk transfer, TLB
//! shoot-downs included. Fixed thresholds keep those blocks in the heap for reuse, and a slow
//! periodic trim gives the memory back once the traffic is over.

use std::time::Duration;

/// How often free heap memory is handed back to the kernel: often enough that what a peak
/// took is returned within seconds of the pool closing its spare connections, rarely enough
/// that a bulk transfer's buffers are not faulted in again more than once per period.
const TRIM_PERIOD: Duration = Duration::from_secs(5);

/// Sets the allocator's thresholds. Call before any other thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters, and no other thread is running yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Starts (once per process) a thread that hands free heap memory back to the kernel every
/// [`TRIM_PERIOD`]. A trim walks the whole heap, so it runs on its own thread rather than on
/// the async runtime.
pub fn release_free_memory() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("weft-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_PERIOD);
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                // SAFETY: malloc_trim is thread-safe; it only releases pages no allocation uses.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that returns free memory");
        }
    });
}
