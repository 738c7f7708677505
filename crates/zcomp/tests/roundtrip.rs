//! Round trips, exact-size checks, algorithm sets, dictionaries and the might-sleep rule.

use std::path::PathBuf;
use std::sync::Arc;

use pagemix::{Mix, PageKind, fill_kind, fill_page};
use zcomp::{
    Algorithm, Backend, Comp, ConfigError, Error, Lz4, PAGE_SIZE, Params, Priority, Stream, Zstd,
};

/// Every backend configuration the round-trip tests cover.
const CONFIGS: &[&str] = &[
    "lz4",
    "zstd",
    "zstd:-50",
    "zstd:-5",
    "zstd:-1",
    "zstd:1",
    "zstd:3",
    "algo=zstd level=9",
];

fn stream(params: &str) -> Stream {
    Comp::parse(params, &[])
        .unwrap_or_else(|e| panic!("{params}: {e}"))
        .new_stream()
        .unwrap()
}

fn page(kind: PageKind, index: u64) -> Box<[u8; PAGE_SIZE]> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    fill_kind(kind, 77, index, &mut p);
    p
}

/// A per-process temporary file that removes itself.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("zcomp-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn every_backend_round_trips_every_kind() {
    for &params in CONFIGS {
        let mut s = stream(params);
        for kind in PageKind::ALL {
            for index in 0..12 {
                let src = page(kind, index);
                let compressed = s.compress(&src).unwrap().to_vec();
                // Zero and same-filled pages shrink to almost nothing, except under zstd's
                // fastest modes: at level -50 it skips so far ahead that a page of one random
                // 8-byte word stays at ~3.8 KB (zram never compresses those pages anyway).
                let fast = params == "zstd:-50";
                if kind == PageKind::Zero || (kind == PageKind::Same && !fast) {
                    assert!(
                        compressed.len() < 128,
                        "{params} {kind}: {}",
                        compressed.len()
                    );
                }
                if kind == PageKind::Random {
                    assert!(compressed.len() >= PAGE_SIZE, "{params} shrank random data");
                }
                let mut dst = [0xa5u8; PAGE_SIZE];
                s.decompress(&compressed, &mut dst)
                    .unwrap_or_else(|e| panic!("{params} {kind} {index}: {e}"));
                assert!(dst == *src, "{params} {kind} {index}: different page back");
            }
        }
    }
}

#[test]
fn mixed_pages_round_trip_and_compress_like_the_calibration() {
    let mix = Mix::default();
    for (params, min_ratio) in [("lz4", 2.2), ("zstd:-1", 2.8), ("zstd:1", 3.0)] {
        let mut s = stream(params);
        let (mut total, n) = (0usize, 256u64);
        let mut src = [0u8; PAGE_SIZE];
        let mut dst = [0u8; PAGE_SIZE];
        for index in 0..n {
            fill_page(&mix, 5, index, &mut src);
            let c = s.compress(&src).unwrap().to_vec();
            total += c.len();
            s.decompress(&c, &mut dst).unwrap();
            assert!(dst == src, "{params} page {index}");
        }
        let ratio = (n as usize * PAGE_SIZE) as f64 / total as f64;
        assert!(ratio > min_ratio, "{params}: ratio {ratio:.2}");
    }
}

#[test]
fn contexts_are_reused_across_pages_without_leaking_state() {
    // The same page compressed before and after others gives the same bytes: a reused context
    // carries nothing from one page into the next.
    for &params in CONFIGS {
        let mut s = stream(params);
        let a = page(PageKind::Heap, 1);
        let first = s.compress(&a).unwrap().to_vec();
        for index in 0..5 {
            s.compress(&page(PageKind::Text, index)).unwrap();
        }
        assert_eq!(s.compress(&a).unwrap(), &first[..], "{params}");
    }
}

#[test]
fn short_and_overlong_output_are_errors() {
    let half = [3u8; PAGE_SIZE / 2];
    let double = [3u8; PAGE_SIZE * 2];
    let mut dst = [0u8; PAGE_SIZE];

    let mut s = stream("lz4");
    let short = lz4_flex::block::compress(&half);
    assert!(matches!(
        s.decompress(&short, &mut dst),
        Err(Error::ShortPage {
            algo: "lz4",
            len: 2048
        })
    ));
    let long = lz4_flex::block::compress(&double);
    assert!(matches!(
        s.decompress(&long, &mut dst),
        Err(Error::Corrupt { algo: "lz4", .. })
    ));

    let mut s = stream("zstd");
    let short = zstd::bulk::compress(&half, 1).unwrap();
    assert!(matches!(
        s.decompress(&short, &mut dst),
        Err(Error::ShortPage {
            algo: "zstd",
            len: 2048
        })
    ));
    let long = zstd::bulk::compress(&double, 1).unwrap();
    let e = s.decompress(&long, &mut dst).unwrap_err();
    assert!(matches!(e, Error::Corrupt { algo: "zstd", .. }), "{e}");
    // The stream still works after errors.
    let p = page(PageKind::Heap, 3);
    let c = s.compress(&p).unwrap().to_vec();
    s.decompress(&c, &mut dst).unwrap();
    assert!(dst == *p);
}

#[test]
fn truncated_and_empty_input_are_errors() {
    for &params in CONFIGS {
        let mut s = stream(params);
        let p = page(PageKind::Text, 9);
        let c = s.compress(&p).unwrap().to_vec();
        let mut dst = [0u8; PAGE_SIZE];
        assert!(
            s.decompress(&[], &mut dst).is_err(),
            "{params}: empty input"
        );
        for cut in [1, 2, c.len() / 2, c.len() - 1] {
            assert!(
                s.decompress(&c[..cut], &mut dst).is_err(),
                "{params}: input cut to {cut} of {} bytes decoded",
                c.len()
            );
        }
    }
}

#[test]
fn secondary_algorithms_keep_their_own_data() {
    let comp = Comp::parse(
        "lz4",
        &["algo=zstd level=9 priority=2", "algo=zstd level=-3"],
    )
    .unwrap();
    let prios: Vec<u8> = comp.priorities().map(Priority::get).collect();
    assert_eq!(prios, [0, 1, 2]);
    assert_eq!(
        comp.params(Priority::new(1).unwrap()).unwrap().level,
        Some(-3)
    );
    assert_eq!(
        comp.backend(Priority::new(2).unwrap()).unwrap().name(),
        "zstd"
    );
    assert!(comp.backend(Priority::new(3).unwrap()).is_none());

    let mut s = comp.new_stream().unwrap();
    let src = page(PageKind::Heap, 4);
    let mut dst = [0u8; PAGE_SIZE];
    let mut sizes = Vec::new();
    for p in comp.priorities() {
        let c = s.codec.compress_with(p, &src).unwrap().to_vec();
        sizes.push(c.len());
        s.codec.decompress_with(p, &c, &mut dst).unwrap();
        assert!(dst == *src, "priority {p}");
    }
    // zstd 9 beats lz4 on a heap page: the priorities really select different algorithms.
    assert!(sizes[2] < sizes[0], "{sizes:?}");

    // Data made by zstd is not lz4 data: the caller must pass the stored priority.
    let z = s
        .codec
        .compress_with(Priority::new(2).unwrap(), &src)
        .unwrap()
        .to_vec();
    assert!(
        s.codec
            .decompress_with(Priority::PRIMARY, &z, &mut dst)
            .is_err()
    );

    let three = Priority::new(3).unwrap();
    assert!(matches!(
        s.codec.compress_with(three, &src),
        Err(Error::NoSuchPriority(p)) if p == three
    ));
    assert!(matches!(
        s.codec.decompress_with(three, &z, &mut dst),
        Err(Error::NoSuchPriority(_))
    ));
    assert_eq!(s.codec.name(Priority::PRIMARY), Some("lz4"));
    assert_eq!(s.codec.name(three), None);
}

#[test]
fn set_configuration_errors() {
    let e = Comp::parse("algo=lz4 priority=1", &[]).unwrap_err();
    assert!(matches!(e, ConfigError::PrimaryPriority(_)), "{e}");
    let e = Comp::parse("lz4", &["algo=zstd priority=0"]).unwrap_err();
    assert!(matches!(e, ConfigError::SecondaryPriority(_)), "{e}");
    let e = Comp::parse(
        "lz4",
        &["algo=zstd priority=1", "algo=zstd level=5 priority=1"],
    )
    .unwrap_err();
    assert!(
        matches!(e, ConfigError::DuplicatePriority(p) if p.get() == 1),
        "{e}"
    );
    let e = Comp::parse("lz4", &["zstd:1", "zstd:2", "zstd:3", "zstd:4"]).unwrap_err();
    assert!(matches!(e, ConfigError::SecondaryPriority(_)), "{e}");
    // An unset priority never takes one named later in the list.
    let comp = Comp::parse("lz4", &["zstd:1", "algo=zstd level=2 priority=1"]).unwrap();
    assert_eq!(
        comp.params(Priority::new(1).unwrap()).unwrap().level,
        Some(2)
    );
    assert_eq!(
        comp.params(Priority::new(2).unwrap()).unwrap().level,
        Some(1)
    );
    let e = Comp::parse("gzip", &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown compression algorithm `gzip` (known: lz4, zstd)"
    );
    assert!(matches!(
        Zstd::new(100, None),
        Err(ConfigError::LevelOutOfRange { level: 100, .. })
    ));

    let lz4: Arc<dyn Backend> = Arc::new(Lz4::new());
    let e = Comp::from_backends(lz4.clone(), vec![(Priority::PRIMARY, lz4.clone())]).unwrap_err();
    assert!(matches!(e, ConfigError::SecondaryPriority(_)));
    let one = Priority::new(1).unwrap();
    let e =
        Comp::from_backends(lz4.clone(), vec![(one, lz4.clone()), (one, lz4.clone())]).unwrap_err();
    assert!(matches!(e, ConfigError::DuplicatePriority(_)));
    let comp = Comp::from_backends(lz4.clone(), vec![(one, lz4)]).unwrap();
    assert!(comp.params(one).is_none());
    comp.new_stream().unwrap();
}

#[test]
fn dictionary_files() {
    // A raw-content dictionary: text of the same origin as the pages compressed with it.
    let mut dict = Vec::new();
    for index in 0..8 {
        dict.extend_from_slice(&page(PageKind::Text, 1000 + index)[..]);
    }
    let file = TempFile::new("dict", &dict);
    let with = format!("algo=zstd level=3 dict={}", file.0.display());
    let comp = Comp::parse(&with, &[]).unwrap();
    let mut s = comp.new_stream().unwrap();
    let mut plain = stream("zstd:3");

    // Pages that repeat the dictionary's content compress far better with it.
    let mut dst = [0u8; PAGE_SIZE];
    for index in 1000..1004 {
        let p = page(PageKind::Text, index);
        let c = s.compress(&p).unwrap().to_vec();
        let without = plain.compress(&p).unwrap().len();
        assert!(
            c.len() * 4 < without,
            "{} with dict, {without} without",
            c.len()
        );
        s.decompress(&c, &mut dst).unwrap();
        assert!(dst == *p);
        // Without the dictionary the data cannot be decoded.
        assert!(plain.decompress(&c, &mut dst).is_err());
    }
    // A second stream from the same set shares the dictionary.
    let mut s2 = comp.new_stream().unwrap();
    let p = page(PageKind::Text, 1001);
    let c = s.compress(&p).unwrap().to_vec();
    s2.decompress(&c, &mut dst).unwrap();
    assert!(dst == *p);
}

#[test]
fn trained_dictionary_round_trips() {
    let samples: Vec<Vec<u8>> = (0..64).map(|i| page(PageKind::Text, i).to_vec()).collect();
    let dict = zstd::dict::from_samples(&samples, 8 * 1024).unwrap();
    let file = TempFile::new("trained", &dict);
    let comp = Comp::new(&Params {
        level: Some(-1),
        dict: Some(file.0.clone()),
        ..Params::new(Algorithm::Zstd)
    })
    .unwrap();
    let mut s = comp.new_stream().unwrap();
    let mut plain = stream("zstd:-1");
    let (mut with, mut without) = (0, 0);
    let mut dst = [0u8; PAGE_SIZE];
    for index in 500..520 {
        let p = page(PageKind::Text, index);
        let c = s.compress(&p).unwrap().to_vec();
        with += c.len();
        without += plain.compress(&p).unwrap().len();
        s.decompress(&c, &mut dst).unwrap();
        assert!(dst == *p);
    }
    assert!(
        with < without,
        "trained dictionary: {with} bytes, without: {without}"
    );
}

#[test]
fn dictionary_errors() {
    let missing = std::env::temp_dir().join("zcomp-no-such-dictionary");
    let e = Comp::parse(&format!("algo=zstd dict={}", missing.display()), &[]).unwrap_err();
    assert!(matches!(e, ConfigError::DictRead { .. }), "{e}");
    assert!(e.to_string().starts_with("cannot read dictionary "), "{e}");

    let empty = TempFile::new("empty", b"");
    let e = Comp::parse(&format!("algo=zstd dict={}", empty.0.display()), &[]).unwrap_err();
    assert!(matches!(e, ConfigError::DictEmpty { .. }), "{e}");

    // The zstd dictionary magic followed by garbage: libzstd rejects its entropy tables.
    let mut bad = vec![0x37, 0xa4, 0x30, 0xec, 1, 0, 0, 0];
    bad.extend(std::iter::repeat_n(0xffu8, 200));
    let bad = TempFile::new("bad", &bad);
    let e = Comp::parse(&format!("algo=zstd dict={}", bad.0.display()), &[]).unwrap_err();
    assert!(
        matches!(e, ConfigError::Context { algo: "zstd", .. }),
        "{e}"
    );
}

#[test]
fn local_copy_and_codec_borrow_together() {
    // What a zram read does: a zsmalloc guard borrows local_copy while the codec decompresses.
    fn read_begin<'a>(object: &[u8], local_copy: &'a mut [u8; PAGE_SIZE]) -> &'a [u8] {
        local_copy[..object.len()].copy_from_slice(object);
        &local_copy[..object.len()]
    }
    let mut s = stream("lz4");
    let src = page(PageKind::Text, 2);
    let stored = s.compress(&src).unwrap().to_vec();
    let mut dst = [0u8; PAGE_SIZE];
    let (local_copy, codec) = s.parts();
    let bytes = read_begin(&stored, local_copy);
    codec.decompress(bytes, &mut dst).unwrap();
    assert!(dst == *src);
    let bytes = read_begin(&stored, &mut s.local_copy);
    s.codec.decompress(bytes, &mut dst).unwrap();
    assert!(dst == *src);
}

#[test]
fn shareable_types() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Comp>();
    send_sync::<Arc<Comp>>();
    send::<Stream>();
    send_sync::<ConfigError>();
    send_sync::<Error>();

    // One set, streams on several threads.
    let comp = Arc::new(Comp::parse("zstd:1", &["lz4"]).unwrap());
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let comp = comp.clone();
            std::thread::spawn(move || {
                let mut s = comp.new_stream().unwrap();
                let mut dst = [0u8; PAGE_SIZE];
                for index in 0..20 {
                    let src = page(PageKind::Heap, t * 100 + index);
                    let c = s.compress(&src).unwrap().to_vec();
                    s.decompress(&c, &mut dst).unwrap();
                    assert!(dst == *src);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn output_buffer_fits_every_worst_case() {
    assert_eq!(zstd::zstd_safe::compress_bound(PAGE_SIZE), 4174);
    assert!(zstd::zstd_safe::compress_bound(PAGE_SIZE) <= zcomp::BUFFER_SIZE);
    assert_eq!(lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 4525);
    assert!(lz4_flex::block::get_maximum_output_size(PAGE_SIZE) <= zcomp::BUFFER_SIZE);
}

#[cfg(debug_assertions)]
mod might_sleep {
    use super::*;

    #[test]
    #[should_panic(expected = "non-sleepable section")]
    fn compress_inside_a_non_sleepable_section_panics() {
        let mut s = stream("lz4");
        let src = page(PageKind::Text, 0);
        let _lock = preempt::NonSleepGuard::new();
        let _ = s.compress(&src);
    }

    #[test]
    #[should_panic(expected = "non-sleepable section")]
    fn decompress_inside_a_non_sleepable_section_panics() {
        let mut s = stream("zstd");
        let src = page(PageKind::Text, 0);
        let c = s.compress(&src).unwrap().to_vec();
        let mut dst = [0u8; PAGE_SIZE];
        let _lock = preempt::NonSleepGuard::new();
        let _ = s.decompress(&c, &mut dst);
    }

    #[test]
    fn outside_the_section_it_works_again() {
        let mut s = stream("lz4");
        let src = page(PageKind::Text, 0);
        {
            let _lock = preempt::NonSleepGuard::new();
        }
        s.compress(&src).unwrap();
    }
}
