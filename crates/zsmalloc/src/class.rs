//! Size classes: which object sizes share a zspage layout.
//!
//! As in Linux: classes from 32 bytes up in steps of 16 to 4096 (255 of them). Each class gets
//! the zspage length (pages per zspage, up to the pool's maximum chain length) that wastes the
//! fewest bytes at the zspage's end; neighbouring classes whose zspages end up with the same
//! (pages per zspage, objects per zspage) are merged into one, since they would behave
//! identically. A class with one object per zspage is "huge": its objects are stored alone in a
//! page, and everything from the first such class up goes into a single merged huge class.

use crate::PAGE_SIZE;

/// Smallest slot: a free slot must hold the free-list link and it keeps objects 16-byte aligned.
pub const MIN_CLASS_SIZE: usize = 32;
/// Distance between consecutive class sizes.
pub const CLASS_DELTA: usize = 16;
/// Number of class sizes before merging: 32, 48, .. 4096.
pub const NR_CLASS_SIZES: usize = (PAGE_SIZE - MIN_CLASS_SIZE).div_ceil(CLASS_DELTA) + 1;
/// Bytes in front of each object of a normal (non-huge) class: the id of the handle that owns
/// it, which compaction needs to find the handle of an object it moves. The kernel uses 8 bytes;
/// our handles are 31-bit ids, so 4 do. Huge objects keep their handle in the zspage instead.
pub const OBJ_HEADER: usize = 4;
/// Shortest and longest zspage chain a pool may be configured with.
pub const MIN_CHAIN: usize = 4;
/// See [`MIN_CHAIN`].
pub const MAX_CHAIN: usize = 16;
/// The kernel's default (CONFIG_ZSMALLOC_CHAIN_SIZE).
pub const DEFAULT_CHAIN: usize = 8;

/// One (merged) size class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeClass {
    /// Index of the class among the merged classes, 0 = smallest.
    pub id: usize,
    /// Slot size in bytes (the largest size merged into this class).
    pub size: usize,
    pub pages_per_zspage: usize,
    pub objs_per_zspage: usize,
}

impl SizeClass {
    /// One object per zspage: stored alone, without an inline header.
    pub fn is_huge(&self) -> bool {
        self.objs_per_zspage == 1
    }

    /// Bytes of each slot taken by the header.
    pub fn header(&self) -> usize {
        if self.is_huge() { 0 } else { OBJ_HEADER }
    }
}

/// The class table of a pool.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Distinct classes, ascending by size.
    pub classes: Vec<SizeClass>,
    /// For each of the 255 class sizes, the id of the class that serves it.
    by_size_index: Vec<u16>,
    /// Smallest object length that is stored in the huge class.
    huge_class_size: usize,
}

/// Pages per zspage with the least waste at the zspage's end (today's mm/zsmalloc.c rule).
pub fn least_waste_chain(size: usize, max_chain: usize) -> usize {
    if size.is_power_of_two() {
        return 1;
    }
    let mut best = 1;
    let mut min_waste = usize::MAX;
    for pages in 1..=max_chain {
        let waste = (pages * PAGE_SIZE) % size;
        if waste < min_waste {
            min_waste = waste;
            best = pages;
        }
    }
    best
}

impl Layout {
    /// The layout for `max_chain` pages per zspage at most.
    pub fn new(max_chain: usize) -> Layout {
        Self::with_rule(max_chain, least_waste_chain)
    }

    pub(crate) fn with_rule(max_chain: usize, chain_of: fn(usize, usize) -> usize) -> Layout {
        let mut by_size_index = vec![0u16; NR_CLASS_SIZES];
        // Built from the largest size down, as the kernel does, so that the first class with
        // more than one object per zspage marks the huge watermark.
        let mut rev: Vec<SizeClass> = Vec::new();
        let mut watermark = None;
        for i in (0..NR_CLASS_SIZES).rev() {
            let size = (MIN_CLASS_SIZE + i * CLASS_DELTA).min(PAGE_SIZE);
            let pages = chain_of(size, max_chain);
            let objs = pages * PAGE_SIZE / size;
            if pages != 1 && objs != 1 && watermark.is_none() {
                watermark = Some(size);
            }
            match rev.last() {
                Some(prev) if prev.pages_per_zspage == pages && prev.objs_per_zspage == objs => {}
                _ => rev.push(SizeClass {
                    id: 0,
                    size,
                    pages_per_zspage: pages,
                    objs_per_zspage: objs,
                }),
            }
            by_size_index[i] = (rev.len() - 1) as u16;
        }
        let n = rev.len();
        rev.reverse();
        for (id, c) in rev.iter_mut().enumerate() {
            c.id = id;
        }
        for id in &mut by_size_index {
            *id = (n - 1) as u16 - *id;
        }
        // Objects whose slot (length + header) is larger than the watermark class do not fit
        // any normal class: the smallest such length is `watermark - header + 1`.
        let huge_class_size = watermark.map_or(1, |w| w - OBJ_HEADER + 1);
        Layout {
            classes: rev,
            by_size_index,
            huge_class_size,
        }
    }

    /// The class that stores objects of `len` bytes (1..=4096).
    pub fn class_for(&self, len: usize) -> &SizeClass {
        debug_assert!((1..=PAGE_SIZE).contains(&len));
        let slot = len + OBJ_HEADER;
        let i = slot.saturating_sub(MIN_CLASS_SIZE).div_ceil(CLASS_DELTA);
        &self.classes[self.by_size_index[i.min(NR_CLASS_SIZES - 1)] as usize]
    }

    /// Objects of this length or longer are stored one per page (zram stores a page that
    /// compresses to this size or more uncompressed).
    pub fn huge_class_size(&self) -> usize {
        self.huge_class_size
    }

    /// The slot size of the huge watermark class as the kernel's documentation tables state it.
    pub fn huge_watermark(&self) -> usize {
        self.huge_class_size + OBJ_HEADER - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule the kernel used before 6.3 (highest integer "used percent"): its documentation's
    /// table of class counts per chain length was made with it.
    fn used_percent_chain(size: usize, max_chain: usize) -> usize {
        let (mut best, mut max_used) = (1, 0);
        for pages in 1..=max_chain {
            let z = pages * PAGE_SIZE;
            let used = (z - z % size) * 100 / z;
            if used > max_used {
                max_used = used;
                best = pages;
            }
        }
        best
    }

    #[test]
    fn class_counts_and_watermarks_match_the_kernel_documentation() {
        // Documentation/mm/zsmalloc.rst: (chain, clusters, huge watermark).
        let table = [
            (4, 69, 3264),
            (5, 86, 3408),
            (6, 93, 3504),
            (7, 112, 3584),
            (8, 123, 3632),
            (9, 140, 3680),
            (10, 143, 3712),
            (11, 159, 3744),
            (12, 164, 3776),
            (13, 180, 3792),
            (14, 183, 3808),
            (15, 188, 3840),
            (16, 191, 3840),
        ];
        for (chain, classes, watermark) in table {
            let l = Layout::with_rule(chain, used_percent_chain);
            assert_eq!(l.classes.len(), classes, "chain {chain}");
            assert_eq!(l.huge_watermark(), watermark, "chain {chain}");
        }
    }

    #[test]
    fn least_waste_rule_as_in_current_kernels() {
        // Since Linux 6.3 the chain is chosen by least waste in bytes; this splits a few more
        // clusters at chain 16 and merges a few at chain 8, with the same huge watermarks.
        for (chain, classes, watermark) in [(4, 69, 3264), (8, 119, 3632), (16, 192, 3840)] {
            let l = Layout::new(chain);
            assert_eq!(l.classes.len(), classes, "chain {chain}");
            assert_eq!(l.huge_watermark(), watermark, "chain {chain}");
        }
        // Class 208 (the kernel's own example): 3 pages waste 16 bytes, 1 page 144.
        assert_eq!(least_waste_chain(208, 8), 3);
        assert_eq!(least_waste_chain(2048, 8), 1);
    }

    #[test]
    fn every_length_maps_to_a_class_that_holds_it() {
        for chain in [4, 8, 16] {
            let l = Layout::new(chain);
            for len in 1..=PAGE_SIZE {
                let c = l.class_for(len);
                assert!(len + c.header() <= c.size, "len {len} in class {c:?}");
                assert_eq!(c.is_huge(), len >= l.huge_class_size(), "len {len}");
                assert!(c.objs_per_zspage * c.size <= c.pages_per_zspage * PAGE_SIZE);
            }
            let huge = l.classes.last().unwrap();
            assert_eq!(
                (huge.size, huge.pages_per_zspage, huge.objs_per_zspage),
                (4096, 1, 1)
            );
            assert_eq!(l.classes.iter().filter(|c| c.is_huge()).count(), 1);
            assert_eq!(l.class_for(1).size, 32);
        }
    }
}
