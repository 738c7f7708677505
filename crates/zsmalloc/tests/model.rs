//! Random sequences of pool operations against a `HashMap<Handle, Vec<u8>>` model.

use proptest::prelude::*;
use std::collections::HashMap;
use zsmalloc::{Config, Handle, PAGE_SIZE, Pool};

#[derive(Clone, Debug)]
enum Op {
    Malloc { len: usize, seed: u8 },
    Write { pick: usize, seed: u8 },
    Read { pick: usize },
    Free { pick: usize },
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    // Lengths weighted toward the compressed-page range, with the edges and huge sizes.
    let len = prop_oneof![
        3 => 1usize..=PAGE_SIZE,
        3 => 300usize..=3000,
        1 => prop::sample::select(vec![1, 2, 27, 28, 29, 3628, 3629, 4095, 4096]),
    ];
    prop_oneof![
        4 => (len, any::<u8>()).prop_map(|(len, seed)| Op::Malloc { len, seed }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(pick, seed)| Op::Write { pick, seed }),
        2 => any::<usize>().prop_map(|pick| Op::Read { pick }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::Compact),
    ]
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 13 / 7) as u8))
        .collect()
}

fn check(pool: &Pool, h: Handle, want: &[u8]) {
    let mut local = [0u8; PAGE_SIZE];
    let g = pool.read_begin(h, &mut local);
    assert_eq!(&*g, want, "handle {h:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pool_behaves_like_a_map(ops in prop::collection::vec(op(), 1..400), chain in 4usize..=16) {
        let pool = Pool::new(Config { max_chain: chain, capacity_pages: 1 << 14, page_limit: 1 << 14 }).unwrap();
        let mut model: HashMap<Handle, Vec<u8>> = HashMap::new();
        let mut live: Vec<Handle> = Vec::new();
        for op in ops {
            match op {
                Op::Malloc { len, seed } => {
                    let h = pool.malloc(len).unwrap();
                    prop_assert!(!model.contains_key(&h), "handle {h:?} handed out twice");
                    let data = content(len, seed);
                    pool.write(h, &data);
                    model.insert(h, data);
                    live.push(h);
                }
                Op::Write { pick, seed } if !live.is_empty() => {
                    let h = live[pick % live.len()];
                    let data = content(model[&h].len(), seed);
                    pool.write(h, &data);
                    model.insert(h, data);
                }
                Op::Read { pick } if !live.is_empty() => {
                    let h = live[pick % live.len()];
                    check(&pool, h, &model[&h]);
                }
                Op::Free { pick } if !live.is_empty() => {
                    let h = live.swap_remove(pick % live.len());
                    pool.free(h);
                    model.remove(&h);
                }
                Op::Compact => {
                    let freeable = pool.freeable_pages();
                    let before = pool.pages_used();
                    let freed = pool.compact();
                    prop_assert_eq!(freed, freeable);
                    prop_assert_eq!(pool.pages_used(), before - freed);
                    prop_assert_eq!(pool.freeable_pages(), 0);
                }
                _ => {}
            }
            prop_assert_eq!(pool.stats().objects, model.len());
        }
        for (h, data) in &model {
            check(&pool, *h, data);
        }
        // Pages in use are exactly what the classes account for.
        let by_class: usize = pool.class_stats().iter().map(|c| c.pages_used).sum();
        prop_assert_eq!(by_class, pool.pages_used());
        for h in live {
            pool.free(h);
        }
        prop_assert_eq!(pool.pages_used(), 0);
    }
}
