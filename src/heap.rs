//! Giving freed heap memory back to the OS.
//!
//! glibc's allocator keeps what it freed in its arenas for reuse; after a load peak (a burst's
//! queues, a catch-up's replayed frames) the process stays at its peak RSS even with no session
//! left. Trimming returns the free pages at the top of each arena and the whole free pages
//! inside them.

/// Returns the allocator's free memory to the OS, where the allocator can (glibc); a no-op
/// elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks; it takes
    // no pointer from us and frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
