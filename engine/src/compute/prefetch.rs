//! Software prefetch for streams the hardware prefetchers pick up too late: the
//! attention's rows (a head's keys or values, 192 KB read once a step in short rows).
//! Measured on the 2-core Xeon VM: the attention loops stalled on their loads (`perf
//! annotate`) and read the cache at about 11 GB/s where the weight kernels read 14-15.

/// Asks for the cache line holding `s[i]` (nothing when `i` is past the end; nothing on
/// targets other than x86-64).
#[inline(always)]
pub fn read<T>(s: &[T], i: usize) {
    if i < s.len() {
        arch::read(s[i..].as_ptr().cast());
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod arch {
    /// `unsafe` is allowed here for the prefetch instruction alone: it reads nothing into
    /// the program and cannot fault, whatever the address.
    #[inline(always)]
    pub(super) fn read(p: *const i8) {
        // SAFETY: a prefetch is a hint; `p` points into a live slice anyway.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod arch {
    #[inline(always)]
    pub(super) fn read(_p: *const i8) {}
}
