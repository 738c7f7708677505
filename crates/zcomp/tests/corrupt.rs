//! Property tests: no input makes any decompressor panic or write outside its page.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use pagemix::{PageKind, fill_kind};
use proptest::prelude::*;
use zcomp::{Comp, PAGE_SIZE, Stream};

/// A raw-content dictionary for the dictionary backend (any bytes are a valid raw dictionary).
/// One file per caller: test threads make their streams concurrently.
fn dict_file() -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "zcomp-corrupt-{}-{}.dict",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut dict = vec![0u8; 2 * PAGE_SIZE];
    fill_kind(
        PageKind::Text,
        1,
        1,
        (&mut dict[..PAGE_SIZE]).try_into().unwrap(),
    );
    fill_kind(
        PageKind::Heap,
        1,
        2,
        (&mut dict[PAGE_SIZE..]).try_into().unwrap(),
    );
    std::fs::write(&path, dict).unwrap();
    path
}

/// One stream per backend configuration worth attacking.
fn streams() -> Vec<(String, Stream)> {
    let dict = dict_file();
    let configs = [
        "lz4".to_string(),
        "zstd:1".to_string(),
        "zstd:-5".to_string(),
        format!("algo=zstd level=3 dict={}", dict.display()),
    ];
    let streams = configs
        .into_iter()
        .map(|c| {
            let s = Comp::parse(&c, &[]).unwrap().new_stream().unwrap();
            (c, s)
        })
        .collect();
    // Loaded into the contexts already.
    let _ = std::fs::remove_file(dict);
    streams
}

/// Decompresses into a page with guard bytes on both sides and checks the guards.
fn decompress_guarded(stream: &mut Stream, src: &[u8]) -> Result<(), zcomp::Error> {
    let mut region = vec![0x5au8; PAGE_SIZE + 128];
    let dst: &mut [u8; PAGE_SIZE] = (&mut region[64..64 + PAGE_SIZE]).try_into().unwrap();
    let result = stream.decompress(src, dst);
    assert!(
        region[..64].iter().all(|&b| b == 0x5a),
        "wrote before the page"
    );
    assert!(
        region[64 + PAGE_SIZE..].iter().all(|&b| b == 0x5a),
        "wrote after the page"
    );
    result
}

fn kind() -> impl Strategy<Value = PageKind> {
    prop::sample::select(PageKind::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
        STREAMS.with_borrow_mut(|streams| {
            for (_, s) in streams {
                let _ = decompress_guarded(s, &bytes);
            }
        });
    }

    /// Random bytes behind a valid zstd frame header get past the magic-number check.
    #[test]
    fn random_zstd_frames_never_panic(body in prop::collection::vec(any::<u8>(), 0..3000)) {
        let mut bytes = vec![0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x10];
        bytes.extend_from_slice(&body);
        STREAMS.with_borrow_mut(|streams| {
            for (_, s) in streams {
                let _ = decompress_guarded(s, &bytes);
            }
        });
    }

    #[test]
    fn mutated_valid_data_never_panics(
        kind in kind(),
        index in 0u64..1000,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        extra in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut page = [0u8; PAGE_SIZE];
        fill_kind(kind, 3, index, &mut page);
        STREAMS.with_borrow_mut(|streams| -> Result<(), TestCaseError> {
          for (name, s) in streams {
            let mut c = s.compress(&page).unwrap().to_vec();
            // The untouched data must come back exactly.
            prop_assert!(decompress_guarded(s, &c).is_ok(), "{} {}", name, kind);
            for (at, xor) in &flips {
                let i = at.index(c.len());
                c[i] ^= xor | 1;
            }
            if truncate {
                c.truncate(cut.index(c.len()));
            }
            c.extend_from_slice(&extra);
            let _ = decompress_guarded(s, &c);
          }
          Ok(())
        })?;
    }

    #[test]
    fn truncation_is_always_detected(
        kind in prop::sample::select(vec![PageKind::Heap, PageKind::Text, PageKind::Random]),
        index in 0u64..1000,
        cut in any::<prop::sample::Index>(),
    ) {
        let mut page = [0u8; PAGE_SIZE];
        fill_kind(kind, 4, index, &mut page);
        STREAMS.with_borrow_mut(|streams| -> Result<(), TestCaseError> {
          for (name, s) in streams {
            let c = s.compress(&page).unwrap().to_vec();
            let cut = cut.index(c.len());
            prop_assert!(
                decompress_guarded(s, &c[..cut]).is_err(),
                "{} decoded {} of {} bytes of a {} page", name, cut, c.len(), kind
            );
          }
          Ok(())
        })?;
    }
}

thread_local! {
    /// Streams are made once per test thread: making zstd contexts per case would dominate.
    static STREAMS: RefCell<Vec<(String, Stream)>> = RefCell::new(streams());
}
