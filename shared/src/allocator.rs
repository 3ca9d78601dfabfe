//! The memory allocator both programs use: jemalloc, tuned for a proxy's
//! mix of many small per-request allocations and large transfer buffers.
//!
//! Chosen by measurement (`BENCHMARKS.md`, request overhead): against glibc's
//! malloc, jemalloc serves more requests per second at 32 connections and
//! costs less CPU per request. Untuned, it also slowed 1 GiB transfers and
//! doubled their peak RSS; the options below remove most of both costs.
//! Building jemalloc needs `make`; without the `jemalloc` feature (and on
//! MSVC, where jemalloc does not build) the system allocator stays.

/// jemalloc's allocator type, for [`crate::tuned_allocator!`].
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
pub use tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options, a NUL-terminated C string that jemalloc
/// reads before `main` (its `malloc_conf` symbol; the `MALLOC_CONF`
/// environment variable, `_RJEM_MALLOC_CONF` here, still overrides it):
///
/// - `tcache_max:1048576`: the thread cache keeps freed blocks up to 1 MiB
///   (default 32 KiB), so a transfer's large buffers are reused without
///   going through the arena; this restores bulk throughput.
/// - `dirty_decay_ms:100`, `muzzy_decay_ms:0`: freed pages go back to the
///   system after 0.1 s instead of 10 s, so a transfer's peak RSS stays
///   near glibc's (`muzzy_decay_ms:0` restates jemalloc 5.3's default).
pub const JEMALLOC_CONF: &[u8] = b"tcache_max:1048576,dirty_decay_ms:100,muzzy_decay_ms:0\0";

/// Installs jemalloc with [`JEMALLOC_CONF`] as the program's global
/// allocator; invoke once, at the top level of a binary's `main.rs`, in a
/// crate with a `jemalloc` feature that enables `passage-shared/jemalloc`.
#[macro_export]
macro_rules! tuned_allocator {
    () => {
        #[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
        #[global_allocator]
        static GLOBAL_ALLOCATOR: $crate::allocator::Jemalloc = $crate::allocator::Jemalloc;

        /// jemalloc reads its options from this symbol before `main`.
        #[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        static JEMALLOC_MALLOC_CONF: Option<&'static u8> =
            Some(&$crate::allocator::JEMALLOC_CONF[0]);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_one_c_string() {
        assert_eq!(JEMALLOC_CONF.last(), Some(&0));
        assert_eq!(JEMALLOC_CONF.iter().filter(|&&b| b == 0).count(), 1);
        let text = std::str::from_utf8(&JEMALLOC_CONF[..JEMALLOC_CONF.len() - 1]).expect("ascii");
        for option in text.split(',') {
            let (key, value) = option.split_once(':').expect("key:value");
            assert!(!key.is_empty() && value.parse::<u64>().is_ok(), "{option}");
        }
    }
}
