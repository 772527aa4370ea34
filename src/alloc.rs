//! The process allocator: glibc for small blocks, and a cache of large blocks that keeps them mapped between uses.
//!
//! A training step allocates and frees the same few dozen large buffers every step (logits chunks, the embedding
//! gradient, attention and MLP activations). glibc serves blocks above its mmap threshold (at most 32 MiB) with a
//! fresh `mmap` and unmaps them on free, so the kernel maps and zeroes every page again on the next step: measured
//! on SmolLM2-135M, a quarter of a step's CPU time was system time (page faults, `clear_page_erms`). Here blocks of
//! at least [`BIG`] bytes are mapped once, rounded up to a size class (1/8 steps per doubling), and kept on free for
//! the next request of the same class. Rounding costs address space, not memory: pages past the requested length
//! are never touched. The cache gives memory back when it would exceed its budget (`RRHF_ALLOC_CACHE_MB`, default a
//! quarter of physical memory; 0 turns caching off).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Requests of at least this many bytes go through the cache (smaller ones to glibc, whose heap reuses them).
pub const BIG: usize = 1 << 16;
/// The smallest threshold: classes are then whole pages (see [`size_class`]).
const MIN_BIG: usize = 4096;
const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
/// One free list per size class: 8 classes per power of two, for every power of two a `usize` holds.
const CLASSES: usize = 8 * usize::BITS as usize;
/// Bytes before the caller's data in a block (the block's mapped size is stored there); keeps 64-byte alignment.
const HEADER: usize = 64;
/// Size classes above the requested one that a cached block may come from (at most ≈ 1.6× the request).
const REUSE_CLASSES: usize = 4;
/// Marks a setting as not read yet.
const UNSET: usize = usize::MAX;

/// The caching allocator; install with `#[global_allocator]` (the `rrhf` binary does).
///
/// Free blocks form one intrusive list per size class (the link is stored in the block's first word), so any
/// number of blocks can wait for reuse and taking or giving one is O(1).
pub struct CachingAlloc {
    lock: AtomicBool,
    heads: std::cell::UnsafeCell<[usize; CLASSES]>,
    cached: AtomicUsize,
    budget: AtomicUsize,
    min_big: AtomicUsize,
}

// SAFETY: `heads` and the links inside free blocks are only touched while `lock` is held.
unsafe impl Sync for CachingAlloc {}

impl CachingAlloc {
    /// An allocator that caches blocks of at least [`BIG`] bytes (or `RRHF_ALLOC_BIG` bytes where set: tests run
    /// tiny models through the cache that way).
    pub const fn new() -> Self {
        Self::with_threshold(UNSET)
    }

    /// An allocator that caches blocks of at least `min_big` bytes (at least a page).
    pub const fn with_threshold(min_big: usize) -> Self {
        Self {
            lock: AtomicBool::new(false),
            heads: std::cell::UnsafeCell::new([0; CLASSES]),
            cached: AtomicUsize::new(0),
            budget: AtomicUsize::new(UNSET),
            min_big: AtomicUsize::new(if min_big < MIN_BIG { MIN_BIG } else { min_big }),
        }
    }

    /// Bytes held in free blocks now.
    pub fn cached_bytes(&self) -> usize {
        self.cached.load(Ordering::Relaxed)
    }

    fn budget(&self) -> usize {
        let b = self.budget.load(Ordering::Relaxed);
        if b != UNSET {
            return b;
        }
        let b = read_budget();
        self.budget.store(b, Ordering::Relaxed);
        b
    }

    fn locked<R>(&self, f: impl FnOnce(&mut [usize; CLASSES]) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held until the store below.
        let r = f(unsafe { &mut *self.heads.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    fn is_big(&self, layout: &Layout) -> bool {
        let mut min = self.min_big.load(Ordering::Relaxed);
        if min == UNSET {
            // Mark first: reading the environment allocates, and those small requests must not recurse here.
            self.min_big.store(BIG, Ordering::Relaxed);
            // At least a page, so that nothing allocated while reading the variable (a few bytes) can count as big
            // when freed.
            min = env_bytes("RRHF_ALLOC_BIG").unwrap_or(BIG).max(MIN_BIG);
            self.min_big.store(min, Ordering::Relaxed);
        }
        layout.size() >= min && layout.align() <= PAGE
    }

    /// Pops a free block of class index `i` (the lock held).
    unsafe fn pop(&self, heads: &mut [usize; CLASSES], i: usize, class: usize) -> Option<*mut u8> {
        let p = heads[i];
        if p == 0 {
            return None;
        }
        heads[i] = *(p as *const usize);
        self.cached.fetch_sub(class, Ordering::Relaxed);
        Some(p as *mut u8)
    }

    /// A block of at least `class` bytes and its mapped size: a cached one (`true`: it holds old data) of this
    /// class or up to [`REUSE_CLASSES`] classes above it (lengths change from step to step; a block already
    /// resident serves better than a new mapping beside it), or a fresh zeroed mapping.
    unsafe fn take(&self, class: usize) -> (*mut u8, usize, bool) {
        let i = class_index(class);
        let hit = self.locked(|heads| {
            (i..(i + REUSE_CLASSES + 1).min(CLASSES)).find_map(|j| {
                let size = class_size(j);
                Some((self.pop(heads, j, size)?, size))
            })
        });
        if let Some((p, size)) = hit {
            return (p, size, true);
        }
        // A miss under memory pressure: give back cached blocks (largest first) before mapping more.
        let budget = self.budget();
        while self.cached_bytes() > 0 && self.cached_bytes() + class > budget {
            let victim = self.locked(|heads| {
                let j = (0..CLASSES).rev().find(|&j| heads[j] != 0)?;
                let size = class_size(j);
                Some((self.pop(heads, j, size)?, size))
            });
            match victim {
                Some((p, size)) => unmap(p, size),
                None => break,
            }
        }
        (map(class), class, false)
    }

    /// Returns a block of mapped size `class` to the cache, or to the system when the cache is full.
    unsafe fn give(&self, ptr: *mut u8, class: usize) {
        let budget = self.budget();
        let i = class_index(class);
        let kept = budget > 0
            && self.locked(|heads| {
                if self.cached_bytes() + class > budget {
                    return false;
                }
                *(ptr as *mut usize) = heads[i];
                heads[i] = ptr as usize;
                self.cached.fetch_add(class, Ordering::Relaxed);
                true
            });
        if !kept {
            unmap(ptr, class);
        }
    }

    /// Where the caller's bytes start in a block: after a header that records the block's mapped size.
    fn data_offset(layout: &Layout) -> usize {
        layout.align().max(HEADER)
    }

    unsafe fn alloc_big(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let off = Self::data_offset(&layout);
        let (base, size, reused) = self.take(size_class(layout.size() + off));
        if base.is_null() {
            return base;
        }
        *(base as *mut usize) = size;
        let p = base.add(off);
        if zeroed && reused {
            std::ptr::write_bytes(p, 0, layout.size());
        }
        p
    }

    unsafe fn dealloc_big(&self, ptr: *mut u8, layout: Layout) {
        let base = ptr.sub(Self::data_offset(&layout));
        self.give(base, *(base as *const usize));
    }
}

impl Default for CachingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

/// The size class of a request: rounded up to 1/8 of its power of two, and to whole pages.
pub fn size_class(size: usize) -> usize {
    let size = size.max(1);
    let top = usize::BITS - 1 - size.leading_zeros();
    let step = if top >= 3 { 1usize << (top - 3) } else { 1 };
    let step = step.max(PAGE);
    size.div_ceil(step) * step
}

/// The free-list index of a class of at least a page: `8 · log2 + the three bits below the top one`.
fn class_index(class: usize) -> usize {
    let top = (usize::BITS - 1 - class.leading_zeros()) as usize;
    8 * top + ((class >> (top - 3)) & 7)
}

/// The class whose index is `i` (inverse of [`class_index`]).
fn class_size(i: usize) -> usize {
    let (top, mant) = (i / 8, i % 8);
    (8 + mant) << (top - 3)
}

/// A byte count from the environment. Reading it allocates only small strings, which go to glibc.
fn env_bytes(var: &str) -> Option<usize> {
    std::env::var(var).ok()?.trim().parse().ok()
}

fn read_budget() -> usize {
    if let Some(mb) = env_bytes("RRHF_ALLOC_CACHE_MB") {
        return mb.saturating_mul(1 << 20);
    }
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page <= 0 {
        return 1 << 30;
    }
    (pages as usize).saturating_mul(page as usize) / 4
}

unsafe fn map(len: usize) -> *mut u8 {
    let p = libc::mmap(
        std::ptr::null_mut(),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    if len >= HUGE {
        // Fewer faults and TLB misses on the large buffers; advisory, so a refusal changes nothing.
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
    }
    p as *mut u8
}

unsafe fn unmap(p: *mut u8, len: usize) {
    libc::munmap(p as *mut libc::c_void, len);
}

unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.is_big(&layout) {
            return System.alloc(layout);
        }
        self.alloc_big(layout, false)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.is_big(&layout) {
            return System.alloc_zeroed(layout);
        }
        self.alloc_big(layout, true)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !self.is_big(&layout) {
            return System.dealloc(ptr, layout);
        }
        self.dealloc_big(ptr, layout);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let (old_big, new_big) = (self.is_big(&layout), self.is_big(&new_layout));
        if !old_big && !new_big {
            return System.realloc(ptr, layout, new_size);
        }
        if old_big && new_big {
            let base = ptr.sub(Self::data_offset(&layout));
            if *(base as *const usize) >= new_size + Self::data_offset(&layout) {
                return ptr;
            }
        }
        let q = self.alloc(new_layout);
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        for size in [
            1usize,
            4095,
            4096,
            5 << 20,
            (5 << 20) + 1,
            123_456_789,
            1 << 30,
        ] {
            let c = size_class(size);
            assert!(c >= size, "{size} → {c}");
            assert!(c - size <= (size / 8).max(PAGE), "{size} → {c}");
            assert_eq!(c % PAGE, 0);
            assert_eq!(size_class(c), c, "a class is its own class");
            if c >= MIN_BIG {
                assert_eq!(class_size(class_index(c)), c);
            }
        }
    }

    #[test]
    fn reused_blocks_hold_no_stale_data_when_zeroed_and_keep_contents_on_realloc() {
        let a = CachingAlloc::with_threshold(1 << 16);
        a.budget.store(64 << 20, Ordering::Relaxed);
        let mut rng = crate::rng::Rng::new(7);
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        for step in 0..400u32 {
            let size = (1 << 14) + (rng.next_u64() % (3 << 20)) as usize;
            let layout = Layout::from_size_align(size, 64).unwrap();
            let zeroed = step % 3 == 0;
            // SAFETY: layouts are non-zero; every pointer is freed once with its own layout.
            unsafe {
                let p = if zeroed {
                    a.alloc_zeroed(layout)
                } else {
                    a.alloc(layout)
                };
                assert!(!p.is_null());
                if zeroed {
                    let s = std::slice::from_raw_parts(p, size);
                    assert!(
                        s.iter().all(|&b| b == 0),
                        "step {step}: stale bytes in a zeroed block"
                    );
                }
                let tag = (step % 251) as u8;
                std::ptr::write_bytes(p, tag, size);
                live.push((p, layout, tag));
                if rng.next_u64().is_multiple_of(2) {
                    let i = (rng.next_u64() as usize) % live.len();
                    let (p, layout, tag) = live.swap_remove(i);
                    let s = std::slice::from_raw_parts(p, layout.size());
                    assert!(
                        s.iter().all(|&b| b == tag),
                        "step {step}: a live block was overwritten"
                    );
                    if rng.next_u64().is_multiple_of(4) {
                        let new_size = layout.size() * 2 + 1;
                        let q = a.realloc(p, layout, new_size);
                        let s = std::slice::from_raw_parts(q, layout.size());
                        assert!(s.iter().all(|&b| b == tag), "realloc lost contents");
                        a.dealloc(q, Layout::from_size_align(new_size, 64).unwrap());
                    } else {
                        a.dealloc(p, layout);
                    }
                }
            }
        }
        for (p, layout, tag) in live {
            // SAFETY: as above.
            unsafe {
                let s = std::slice::from_raw_parts(p, layout.size());
                assert!(s.iter().all(|&b| b == tag));
                a.dealloc(p, layout);
            }
        }
        assert!(a.cached_bytes() <= 64 << 20, "the budget bounds the cache");
    }

    #[test]
    fn a_freed_block_serves_the_next_request_of_its_class() {
        let a = CachingAlloc::with_threshold(1 << 16);
        a.budget.store(64 << 20, Ordering::Relaxed);
        let layout = Layout::from_size_align(1 << 20, 64).unwrap();
        // SAFETY: each allocation is freed once with its own layout.
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(p, layout);
            assert_eq!(a.cached_bytes(), size_class((1 << 20) + HEADER));
            let smaller = Layout::from_size_align((1 << 20) - 100, 64).unwrap();
            let q = a.alloc(smaller);
            assert_eq!(p, q, "same class, same block");
            assert_eq!(a.cached_bytes(), 0);
            a.dealloc(q, smaller);
            // A request a few classes smaller takes the cached block too; one far smaller does not.
            let r = a.alloc(Layout::from_size_align(900 << 10, 64).unwrap());
            assert_eq!(p, r, "a block up to four classes larger serves");
            a.dealloc(r, Layout::from_size_align(900 << 10, 64).unwrap());
            let s = a.alloc(Layout::from_size_align(300 << 10, 64).unwrap());
            assert_ne!(p, s, "a block more than four classes larger stays cached");
            assert_eq!(a.cached_bytes(), size_class((1 << 20) + HEADER));
            a.dealloc(s, Layout::from_size_align(300 << 10, 64).unwrap());
        }
    }

    #[test]
    fn a_zero_budget_caches_nothing() {
        let a = CachingAlloc::with_threshold(1 << 16);
        a.budget.store(0, Ordering::Relaxed);
        let layout = Layout::from_size_align(1 << 20, 64).unwrap();
        // SAFETY: one allocation freed once.
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(p, layout);
        }
        assert_eq!(a.cached_bytes(), 0);
    }
}
