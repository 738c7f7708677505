//! Object sizes as zram would hand them to the pool: lz4 sizes of swap-like pages.

use pagemix::{Mix, PageKind, fill_page};
use zsmalloc::PAGE_SIZE;

/// Lengths of the objects that `pages` swap-like pages become: zero and same-filled pages need
/// no object (zram keeps them in the slot), pages that compress to `huge` bytes or more are
/// stored whole.
pub fn swap_object_sizes(pages: u64, huge: usize) -> Vec<usize> {
    let mix = Mix::default();
    let mut page = [0u8; PAGE_SIZE];
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)];
    (0..pages)
        .filter_map(|i| match fill_page(&mix, 1, i, &mut page) {
            PageKind::Zero | PageKind::Same => None,
            _ => {
                let n = lz4_flex::block::compress_into(&page, &mut out).unwrap();
                Some(if n >= huge { PAGE_SIZE } else { n })
            }
        })
        .collect()
}
