//! How weft uses the C allocator (glibc's malloc).
//!
//! By default glibc gives large freed blocks straight back to the kernel: blocks above the
//! mmap threshold are unmapped, and free memory at the top of the heap is trimmed. A busy
//! tunnel frees and allocates its relay and TLS buffers for every chunk it moves, so each one
//! was unmapped and faulted in again: a fifth of a node's CPU under a bulk transfer, TLB
//! shoot-downs included. Fixed thresholds keep those blocks in the heap for reuse, and a slow
//! periodic trim gives the memory back once the traffic is over.

use std::time::Duration;

/// How often free heap memory is handed back to the kernel.
const TRIM_PERIOD: Duration = Duration::from_secs(10);

/// Sets the allocator's thresholds. Call before any other thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters, and no other thread is running yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Hands free heap memory back to the kernel every [`TRIM_PERIOD`], so memory taken during a
/// burst of connections does not stay with the process.
pub async fn release_free_memory() {
    let mut tick = tokio::time::interval(TRIM_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim is thread-safe; it only releases pages no allocation uses.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
