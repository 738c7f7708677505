//! The control plane over a real socket: a Server on a temporary path, real stores and
//! devices, driven through the client API and through raw lines.

use pagemix::PageKind;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};
use vzram::BlkDevice;
use vzram::client::{Call, Client, ClientCommand, ClientError, ControlArgs, StatFormat, run_to};
use vzram::control::{
    Compact, ControlError, ControlHandle, Devices, Idle, MemLimit, PageType, Policy, PolicyKnobs,
    Recompress, RecompressDevice, ResetMemUsedMax, Server, ServerConfig, Stat, StatReply,
    Writeback, WritebackLimit,
};
use zram::{PAGE_SIZE, Store};

/// What a client command prints.
fn printed(cmd: ClientCommand) -> String {
    let mut out = Vec::new();
    run_to(cmd, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// Every answer must come within this; a hang fails the test instead of blocking it.
const TIMEOUT_SECS: u64 = 60;
const DEADLINE: Duration = Duration::from_secs(60);

/// A directory for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vzram-ctl-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct DevSpec {
    name: &'static str,
    pages: u64,
    queues: usize,
    /// A zstd:9 recompression algorithm at priority 1.
    recomp: bool,
    backing: bool,
}

fn dev(name: &'static str) -> DevSpec {
    DevSpec {
        name,
        pages: 4096,
        queues: 2,
        recomp: true,
        backing: false,
    }
}

struct Fixture {
    store: Arc<Store>,
    served: Vec<Arc<BlkDevice>>,
    handle: Option<ControlHandle>,
    socket: PathBuf,
    dir: TempDir,
}

impl Fixture {
    fn new(devices: &[DevSpec]) -> Fixture {
        Fixture::with(devices, |cfg| cfg.policy.config.enabled = false)
    }

    /// Devices first, then the server: a test can prepare the store before the control
    /// plane (and its background compaction) sees it.
    fn unstarted(devices: &[DevSpec]) -> Fixture {
        let dir = TempDir::new();
        let store = Arc::new(
            Store::new(zram::StoreConfig {
                capacity_pages: 1 << 16,
                ..Default::default()
            })
            .unwrap(),
        );
        let served = devices
            .iter()
            .map(|d| {
                let comp = if d.recomp {
                    zcomp::Comp::parse("lz4", &["algo=zstd level=9 priority=1"])
                } else {
                    zcomp::Comp::parse("lz4", &[])
                }
                .unwrap();
                let device = zram::Device::new(
                    store.clone(),
                    Arc::new(comp),
                    zram::Config {
                        size: d.pages * PAGE_SIZE as u64,
                        backing_file: d.backing.then(|| dir.0.join(format!("{}.backing", d.name))),
                    },
                )
                .unwrap();
                BlkDevice::new(
                    d.name.into(),
                    dir.0.join(format!("{}.sock", d.name)),
                    device,
                    d.queues,
                    false,
                    format!("serial-{}", d.name),
                )
            })
            .collect();
        Fixture {
            socket: dir.0.join("vzram.ctl"),
            store,
            served,
            handle: None,
            dir,
        }
    }

    fn with(devices: &[DevSpec], cfg: impl FnOnce(&mut ServerConfig)) -> Fixture {
        let mut f = Fixture::unstarted(devices);
        f.start(cfg, || {});
        f
    }

    fn start(
        &mut self,
        cfg: impl FnOnce(&mut ServerConfig),
        on_shutdown: impl FnMut() + Send + 'static,
    ) {
        let mut config = ServerConfig::new(&self.socket);
        cfg(&mut config);
        self.handle = Some(
            Server::start(config, self.served.clone(), self.store.clone(), on_shutdown).unwrap(),
        );
    }

    fn device(&self, i: usize) -> &zram::Device {
        &self.served[i].zram
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket, TIMEOUT_SECS).unwrap()
    }

    fn conn(&self) -> ControlArgs {
        ControlArgs {
            control: Some(self.socket.clone()),
            timeout: Some(TIMEOUT_SECS),
        }
    }

    fn raw(&self) -> Raw {
        Raw::connect(&self.socket)
    }
}

/// A client speaking raw lines.
struct Raw {
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(TIMEOUT_SECS)))
            .unwrap();
        Raw {
            reader: BufReader::new(s),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    fn answer(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "connection closed without an answer");
        assert!(line.ends_with('\n'));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn ask(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes());
        self.answer()
    }
}

fn error_of(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "{v}");
    assert!(v.get("result").is_none(), "{v}");
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

/// Writes pages `range` of `kind`.
fn fill(dev: &zram::Device, range: std::ops::Range<u64>, kind: PageKind) {
    let mut stream = dev.new_stream();
    let mut page = [0u8; PAGE_SIZE];
    for i in range {
        pagemix::fill_kind(kind, 7, i, &mut page);
        dev.write_page(i, &page, &mut stream).unwrap();
    }
}

fn check_page(dev: &zram::Device, i: u64, kind: PageKind) {
    let mut stream = dev.new_stream();
    let mut want = [0u8; PAGE_SIZE];
    let mut got = [0u8; PAGE_SIZE];
    pagemix::fill_kind(kind, 7, i, &mut want);
    dev.read_page(i, &mut got, &mut stream).unwrap();
    assert!(want == got, "page {i} differs");
}

/// Polls `cond` until it holds or the deadline passes.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stat_matches_the_devices() {
    let f = Fixture::new(&[
        dev("vz0"),
        DevSpec {
            queues: 4,
            recomp: false,
            ..dev("vz1")
        },
    ]);
    fill(f.device(0), 0..300, PageKind::Heap);
    fill(f.device(0), 300..320, PageKind::Same);
    fill(f.device(0), 320..330, PageKind::Random);
    fill(f.device(1), 0..50, PageKind::Text);
    f.served[1].queues[3].requests.store(5, Relaxed);
    f.served[1].queues[3].write_bytes.store(5 * 4096, Relaxed);
    f.served[1].queues[0].write_bytes.store(4096, Relaxed);
    f.served[1].connected.store(true, Relaxed);
    f.served[1].connections.store(2, Relaxed);
    f.store.set_mem_limit(64 << 20);

    let stat = f.client().call(&Stat {}).unwrap();
    assert_eq!(stat.devices.len(), 2);
    for (d, s) in stat.devices.iter().zip(&f.served) {
        assert_eq!(d.name, s.name);
        assert_eq!(d.socket, s.socket.display().to_string());
        assert_eq!(d.streams, s.queues.len());
        let z = s.zram.stats();
        assert_eq!(
            (&d.mm_stat, &d.io_stat, &d.bd_stat),
            (&z.mm_stat, &z.io_stat, &z.bd_stat),
            "{}",
            d.name
        );
        let queues: Vec<_> = s.queues.iter().map(|q| q.snapshot()).collect();
        assert_eq!(d.queues, queues);
    }
    let (d0, d1) = (&stat.devices[0], &stat.devices[1]);
    assert_eq!(d0.disksize, 4096 * 4096);
    assert_eq!(d0.comp_algorithm, "lz4");
    assert_eq!(d0.mm_stat.orig_data_size, 330 * 4096);
    assert_eq!(d0.mm_stat.same_pages, 20);
    assert!(d0.mm_stat.huge_pages >= 10, "the random pages are huge");
    assert_eq!(d0.recomp_algorithms.len(), 1);
    assert_eq!(d0.recomp_algorithms[0].algorithm, "zstd:9");
    assert_eq!(d0.recomp_algorithms[0].priority, 1);
    assert!(!d0.connected);
    assert!(d1.recomp_algorithms.is_empty());
    assert!(d1.connected);
    assert_eq!(d1.connections, 2);
    assert_eq!(d1.streams, 4);
    assert_eq!(d1.queues[3].requests, 5);
    // The device's I/O totals are its queues' (zram does not count requests).
    assert_eq!((d1.write_bytes, d1.writes), (6 * 4096, 0));
    assert_eq!(stat.store.mem_limit, 64 << 20);
    assert_eq!(stat.store.mem_used_total, f.store.mem_used_total());
    assert_eq!(stat.store.mem_used_max, f.store.mem_used_max());
    assert_eq!(
        stat.store.pool.pages_used as u64 * 4096,
        f.store.mem_used_total()
    );
    assert!(stat.store.mem_used_total > 0);

    // The table and the JSON the `vzram stat` command prints.
    let text = printed(ClientCommand::Stat {
        format: StatFormat::Text,
        json: false,
        conn: f.conn(),
    });
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains("\nvz0 "), "{text}");
    assert!(
        text.contains(&d0.mm_stat.orig_data_size.to_string()),
        "{text}"
    );
    assert!(
        text.contains("vz1: connected (2 connections so far)"),
        "{text}"
    );
    assert!(text.contains("mem_limit 64M"), "{text}");
    // What node_exporter's textfile collector reads.
    let prom = printed(ClientCommand::Stat {
        format: StatFormat::Prometheus,
        json: false,
        conn: f.conn(),
    });
    assert!(
        prom.contains(&format!(
            "vzram_orig_data_size_bytes{{device=\"vz0\"}} {}\n",
            d0.mm_stat.orig_data_size
        )),
        "{prom}"
    );
    assert!(
        prom.contains("vzram_store_mem_limit_bytes 67108864\n"),
        "{prom}"
    );
    let out = printed(ClientCommand::Stat {
        format: StatFormat::Text,
        json: true,
        conn: f.conn(),
    });
    let parsed: StatReply = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed.devices[0].mm_stat, f.device(0).stats().mm_stat);
    // zram's field names in the JSON, at the device's top level.
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["devices"][0]["mm_stat"]["same_pages"], 20);
    assert_eq!(v["devices"][0]["disksize"], 4096 * 4096);
}

#[test]
fn compact_frees_pages() {
    let f = Fixture::new(&[dev("vz0")]);
    let d = f.device(0);
    fill(d, 0..2000, PageKind::Heap);
    for i in (0..2000).step_by(2) {
        d.discard(i, 1).unwrap();
    }
    let freeable = f.store.freeable_pages();
    assert!(freeable > 0, "the test needs a fragmented pool");
    let used = f.store.mem_used_total();

    let r = f.client().call(&Compact {}).unwrap();
    assert!(r.pages_freed > 0);
    assert_eq!(r.pages_compacted, f.store.pages_compacted());
    assert_eq!(f.store.mem_used_total(), used - r.pages_freed * 4096);
    assert!(f.store.freeable_pages() < freeable);
    for i in (1..2000).step_by(2) {
        check_page(d, i, PageKind::Heap);
    }
    assert!(
        printed(ClientCommand::Compact(Call {
            args: Compact {},
            conn: f.conn(),
        }))
        .starts_with("compaction freed")
    );
}

#[test]
fn idle_then_recompress_shrinks_pages() {
    let f = Fixture::new(&[
        dev("vz0"),
        DevSpec {
            recomp: false,
            ..dev("plain")
        },
    ]);
    fill(f.device(0), 0..400, PageKind::Text);
    fill(f.device(1), 0..10, PageKind::Text);
    let mut c = f.client();

    // Freshly written pages are not an hour old.
    let r = c
        .call(&Idle {
            device: None,
            age_secs: Some(3600),
        })
        .unwrap();
    assert!(r.devices.iter().all(|d| d.marked == 0), "{r:?}");
    let r = c
        .call(&Idle {
            device: Some("vz0".into()),
            age_secs: None,
        })
        .unwrap();
    assert_eq!(r.devices.len(), 1);
    assert_eq!(
        (r.devices[0].name.as_str(), r.devices[0].marked),
        ("vz0", 400)
    );

    let before = f.device(0).stats().mm_stat.compr_data_size;
    let recompress = |device: Option<&str>, max_pages| Recompress {
        device: device.map(Into::into),
        page_type: PageType::Idle,
        threshold: None,
        max_pages,
        priority: None,
    };
    let r = c.call(&recompress(None, Some(100))).unwrap();
    // Every device was asked; the one without zstd is skipped, not an error.
    assert_eq!(r.devices.len(), 1);
    assert_eq!(r.devices[0].name, "vz0");
    assert_eq!(r.devices[0].tried, 100);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].name, "plain");
    let r = c.call(&recompress(Some("vz0"), None)).unwrap();
    assert_eq!(r.devices[0].tried, 300, "the rest of the idle pages");
    let after = f.device(0).stats().mm_stat.compr_data_size;
    assert!(
        after < before,
        "zstd:9 shrinks text pages: {after} < {before}"
    );
    for i in 0..400 {
        check_page(f.device(0), i, PageKind::Text);
    }

    // Naming a device that cannot recompress is an error; so is a bad priority.
    let e = c.call(&recompress(Some("plain"), None)).unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(m) if m.contains("plain")),
        "{e}"
    );
    let e = c
        .call(&Recompress {
            device: None,
            page_type: PageType::Huge,
            threshold: None,
            max_pages: None,
            priority: Some(0),
        })
        .unwrap_err();
    assert!(e.to_string().contains("priority 0"), "{e}");

    // The command-line path prints a line per device.
    let text = printed(ClientCommand::Idle(Call {
        args: Idle {
            age_secs: None,
            device: None,
        },
        conn: f.conn(),
    }));
    assert!(text.contains("vz0: 400 pages marked idle"), "{text}");
    assert!(text.contains("plain: 10 pages marked idle"), "{text}");
}

#[test]
fn writeback_moves_pages_to_the_backing_file() {
    let f = Fixture::new(&[
        DevSpec {
            backing: true,
            ..dev("vz0")
        },
        dev("nobacking"),
    ]);
    let d = f.device(0);
    fill(d, 0..100, PageKind::Heap);
    fill(f.device(1), 0..10, PageKind::Heap);
    let mut c = f.client();
    let writeback = |device: Option<&str>, limit_pages| Writeback {
        device: device.map(Into::into),
        page_type: PageType::Idle,
        limit_pages,
    };

    // Nothing is idle yet.
    let r = c.call(&writeback(None, None)).unwrap();
    assert_eq!(r.devices[0].written, 0);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].name, "nobacking");

    c.call(&Idle {
        device: None,
        age_secs: None,
    })
    .unwrap();
    let r = c.call(&writeback(None, Some(10))).unwrap();
    assert_eq!(r.devices[0].written, 10);
    assert_eq!(d.stats().bd_stat.bd_count, 10);
    assert_eq!(d.stats().bd_stat.bd_writes, 10);

    // The writeback budget caps the next pass.
    let r = c
        .call(&WritebackLimit {
            device: Some("vz0".into()),
            pages: Some(5),
        })
        .unwrap();
    assert_eq!(r.devices, ["vz0"]);
    let r = c.call(&writeback(Some("vz0"), None)).unwrap();
    assert_eq!(r.devices[0].written, 5);
    c.call(&WritebackLimit {
        device: None,
        pages: None,
    })
    .unwrap();
    let r = c.call(&writeback(Some("vz0"), None)).unwrap();
    assert_eq!(r.devices[0].written, 85);
    let stats = d.stats();
    assert_eq!(stats.bd_stat.bd_count, 100);
    assert_eq!(stats.mm_stat.compr_data_size, 0);
    for i in 0..100 {
        check_page(d, i, PageKind::Heap);
    }
    assert_eq!(d.stats().bd_stat.bd_reads, 100);

    let e = c.call(&writeback(Some("nobacking"), None)).unwrap_err();
    assert!(e.to_string().contains("nobacking: no backing file"), "{e}");
}

#[test]
fn no_eligible_device_is_an_error() {
    let f = Fixture::new(&[DevSpec {
        recomp: false,
        ..dev("vz0")
    }]);
    let mut c = f.client();
    let e = c
        .call(&Writeback {
            device: None,
            page_type: PageType::Huge,
            limit_pages: None,
        })
        .unwrap_err();
    assert!(
        e.to_string().contains("no device has a backing file"),
        "{e}"
    );
    let e = c
        .call(&Recompress {
            device: None,
            page_type: PageType::Huge,
            threshold: Some(2000),
            max_pages: None,
            priority: None,
        })
        .unwrap_err();
    assert!(e.to_string().contains("recompression algorithm"), "{e}");
}

/// A device's own limit, set at run time over the control socket: that device's writes stop
/// at it (no backing file: nothing to move out), the other device's go on.
#[test]
fn a_device_limit_is_set_at_run_time_and_holds_only_that_device() {
    let f = Fixture::new(&[dev("vz0"), dev("vz1")]);
    let mut c = f.client();
    let r = c
        .call(&MemLimit {
            device: Some("vz1".into()),
            bytes: 1 << 20,
        })
        .unwrap();
    assert_eq!((r.device.as_deref(), r.mem_limit), (Some("vz1"), 1 << 20));
    assert_eq!(f.store.mem_limit(), 0, "the store's limit is untouched");
    let write = |d: &zram::Device, n: u64| {
        let mut stream = d.new_stream();
        let mut page = [0u8; PAGE_SIZE];
        (0..n)
            .filter(|&i| {
                pagemix::fill_kind(PageKind::Random, 1, i, &mut page);
                d.write_page(i, &page, &mut stream).is_err()
            })
            .count()
    };
    assert!(write(f.device(1), 1000) > 0, "vz1 stops at its limit");
    assert_eq!(write(f.device(0), 1000), 0, "vz0 is not limited");
    let st = c.call(&Stat {}).unwrap();
    let m = &st.devices[1].memory;
    assert_eq!(m.limit, 1 << 20);
    assert!(m.used <= (1 << 20) + (1 << 16), "{m:?}");
    assert!(
        st.devices[0].memory.used > 3 << 20,
        "{:?}",
        st.devices[0].memory
    );
    assert!(st.devices[1].io_stat.failed_writes > 0);
    let e = c
        .call(&MemLimit {
            device: Some("vz9".into()),
            bytes: 1,
        })
        .unwrap_err();
    assert!(e.to_string().contains("unknown device \"vz9\""), "{e}");
}

#[test]
fn mem_limit_and_mem_used_max() {
    let f = Fixture::new(&[dev("vz0")]);
    let mut c = f.client();
    let r = c
        .call(&MemLimit {
            device: None,
            bytes: 1 << 20,
        })
        .unwrap();
    assert_eq!(r.mem_limit, 1 << 20);
    assert_eq!(f.store.mem_limit(), 1 << 20);
    assert_eq!(c.call(&Stat {}).unwrap().store.mem_limit, 1 << 20);
    // The limit holds: 1 MiB of pool takes far fewer than 2000 pages.
    let d = f.device(0);
    let mut stream = d.new_stream();
    let mut page = [0u8; PAGE_SIZE];
    let failed = (0..2000)
        .filter(|&i| {
            pagemix::fill_kind(PageKind::Random, 1, i, &mut page);
            d.write_page(i, &page, &mut stream).is_err()
        })
        .count();
    assert!(failed > 0);
    assert!(f.store.mem_used_total() <= 1 << 20);

    let text = printed(ClientCommand::MemLimit(Call {
        args: MemLimit {
            device: None,
            bytes: 0,
        },
        conn: f.conn(),
    }));
    assert!(text.starts_with("mem_limit: none, in use "), "{text}");
    assert_eq!(f.store.mem_limit(), 0);

    // mem_used_max stays at the high-water mark until reset.
    d.discard(0, 2000).unwrap();
    f.store.compact();
    assert!(f.store.mem_used_max() > f.store.mem_used_total());
    let r = c.call(&ResetMemUsedMax {}).unwrap();
    assert_eq!(r.mem_used_max, f.store.mem_used_total());
    assert_eq!(f.store.mem_used_max(), f.store.mem_used_total());
}

#[test]
fn bad_requests_get_errors_and_the_server_keeps_answering() {
    let f = Fixture::new(&[dev("vz0")]);
    let mut raw = f.raw();
    // Several requests in one write, one split over two writes, garbage, blank lines.
    raw.send(b"{\n[1,2]\n{\"cmd\":\"frob\",\"id\":1}\n\n   \r\n");
    raw.send(b"{\"cmd\":\"idle\",\"device\":\"vz9\"");
    raw.send(b",\"id\":2}\n\xff\xfe\x00garbage\n{\"cmd\":\"mem_limit\"}\n");
    raw.send(b"{\"cmd\":\"stat\",\"extra\":true}\n{\"cmd\":\"recompress\",\"type\":\"idle\",\"threshold\":0}\n");
    raw.send(b"{\"cmd\":\"stat\",\"id\":\"last\"}\n");
    assert!(error_of(&raw.answer()).starts_with("malformed JSON"));
    assert!(error_of(&raw.answer()).contains("must be a JSON object"));
    let a = raw.answer();
    assert!(error_of(&a).contains("unknown command \"frob\""));
    assert_eq!(a["id"], 1);
    let a = raw.answer();
    assert!(error_of(&a).contains("unknown device \"vz9\" (devices: vz0)"));
    assert_eq!(a["id"], 2);
    assert!(error_of(&raw.answer()).starts_with("malformed JSON"));
    assert!(error_of(&raw.answer()).contains("missing field `bytes`"));
    assert!(error_of(&raw.answer()).contains("unknown field `extra`"));
    assert!(error_of(&raw.answer()).contains("threshold 0"));
    let a = raw.answer();
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["id"], "last");
    assert_eq!(a["result"]["devices"][0]["name"], "vz0");
    assert!(a.get("error").is_none());

    // The same through the client API and the command-line path.
    let e = f
        .client()
        .call(&Idle {
            device: Some("nope".into()),
            age_secs: None,
        })
        .unwrap_err();
    assert!(matches!(&e, ClientError::Server(m) if m.contains("unknown device \"nope\"")));
    let e = run_to(
        ClientCommand::WritebackLimit(Call {
            args: WritebackLimit {
                pages: Some(1),
                device: Some("nope".into()),
            },
            conn: f.conn(),
        }),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(!e.to_string().contains('\n'));
    assert!(e.to_string().contains("unknown device"), "{e}");
    assert!(f.client().call(&Stat {}).is_ok());
}

#[test]
fn overlong_line_is_refused_and_only_that_connection_closes() {
    let f = Fixture::new(&[dev("vz0")]);
    let mut other = f.raw();
    let mut raw = f.raw();
    let big = vec![b' '; vzram::control::MAX_LINE + 4096];
    // The server stops reading at the limit, so the write may fail part-way: fine.
    let _ = raw.reader.get_mut().write_all(&big);
    assert!(error_of(&raw.answer()).contains("longer than 65536 bytes"));
    let mut rest = Vec::new();
    // After the answer the server closes the connection (EOF, or a reset since it left input
    // unread).
    match raw.reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert_eq!(other.ask(r#"{"cmd":"stat"}"#)["ok"], true);
    // A long line under the limit is fine.
    let mut line = br#"{"cmd":"stat"}"#.to_vec();
    line.resize(vzram::control::MAX_LINE, b' ');
    line.push(b'\n');
    other.send(&line);
    assert_eq!(other.answer()["ok"], true);
}

#[test]
fn many_clients_at_once() {
    let f = Fixture::new(&[dev("vz0"), dev("vz1")]);
    fill(f.device(0), 0..200, PageKind::Heap);
    // Idle connections in the way do not block the others.
    let idle: Vec<Raw> = (0..20).map(|_| f.raw()).collect();
    let socket = f.socket.clone();
    std::thread::scope(|s| {
        for t in 0..12 {
            let socket = &socket;
            s.spawn(move || {
                let mut c = Client::connect(socket, TIMEOUT_SECS).unwrap();
                for i in 0..25 {
                    match (t + i) % 3 {
                        0 => {
                            let st = c.call(&Stat {}).unwrap();
                            assert_eq!(st.devices.len(), 2);
                        }
                        1 => {
                            c.call(&Idle {
                                device: Some("vz1".into()),
                                age_secs: Some(1000),
                            })
                            .unwrap();
                        }
                        _ => {
                            let e = c
                                .call(&Idle {
                                    device: Some(format!("missing{t}")),
                                    age_secs: None,
                                })
                                .unwrap_err();
                            assert!(e.to_string().contains(&format!("missing{t}")));
                        }
                    }
                }
            });
        }
        // Pipelining on one connection: answers come in order, ids echoed.
        s.spawn(|| {
            let mut raw = Raw::connect(&socket);
            let batch: String = (0..200)
                .map(|i| format!("{{\"cmd\":\"stat\",\"id\":{i}}}\n"))
                .collect();
            raw.send(batch.as_bytes());
            for i in 0..200 {
                let a = raw.answer();
                assert_eq!(a["ok"], true);
                assert_eq!(a["id"], i);
            }
        });
    });
    drop(idle);
    assert!(f.client().call(&Stat {}).is_ok());
}

#[test]
fn clients_that_vanish_do_not_hurt_the_server() {
    let f = Fixture::new(&[dev("vz0")]);
    for _ in 0..20 {
        // Gone mid-line.
        let mut raw = f.raw();
        raw.send(br#"{"cmd":"st"#);
        drop(raw);
        // Gone without a word.
        drop(f.raw());
        // Gone before reading the answer (the server's send fails with EPIPE, which must
        // not be a SIGPIPE).
        let mut raw = f.raw();
        raw.send(b"{\"cmd\":\"stat\"}\n{\"cmd\":\"stat\"}\n{\"cmd\":\"stat\"}\n");
        drop(raw);
        // Half-closed after a last request without a newline: still answered.
        let mut raw = f.raw();
        raw.send(br#"{"cmd":"stat","id":"eof"}"#);
        raw.reader
            .get_ref()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let a = raw.answer();
        assert_eq!(a["id"], "eof");
        let mut rest = String::new();
        raw.reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "closed after the answer");
    }
    assert!(f.client().call(&Stat {}).is_ok());
}

#[test]
fn socket_mode_replacement_and_removal() {
    let mut f = Fixture::new(&[dev("vz0")]);
    let mode = std::fs::metadata(&f.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // No temporary name left next to it.
    let names: Vec<_> = std::fs::read_dir(&f.dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["vzram.ctl"]);

    // A second server on a live socket is refused and leaves it alone.
    let e = Server::start(
        ServerConfig::new(&f.socket),
        f.served.clone(),
        f.store.clone(),
        || {},
    )
    .unwrap_err();
    assert!(matches!(e, ControlError::InUse(_)), "{e}");
    assert!(f.client().call(&Stat {}).is_ok());

    // Stopping with a client connected: it sees EOF, the socket file goes.
    let mut raw = f.raw();
    assert_eq!(raw.ask(r#"{"cmd":"stat"}"#)["ok"], true);
    f.handle.take().unwrap().stop().unwrap();
    assert!(!f.socket.exists());
    let mut rest = Vec::new();
    raw.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(matches!(
        Client::connect(&f.socket, 1),
        Err(ClientError::Connect { .. })
    ));

    // A stale socket (a crashed daemon's) is replaced; the mode is configurable.
    drop(std::os::unix::net::UnixListener::bind(&f.socket).unwrap());
    assert!(f.socket.exists());
    f.start(|c| c.mode = 0o660, || {});
    let mode = std::fs::metadata(&f.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    assert!(f.client().call(&Stat {}).is_ok());
    drop(f.handle.take());
    assert!(
        !f.socket.exists(),
        "dropping the handle stops the server too"
    );

    // Anything else at the path is not touched.
    std::fs::write(&f.socket, b"precious").unwrap();
    let e = Server::start(
        ServerConfig::new(&f.socket),
        f.served.clone(),
        f.store.clone(),
        || {},
    )
    .unwrap_err();
    assert!(matches!(e, ControlError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read(&f.socket).unwrap(), b"precious");
}

/// The policy compacts by itself once freeable pages pass a fraction of the pool.
#[test]
fn the_policy_compacts_a_fragmented_pool() {
    let mut f = Fixture::unstarted(&[dev("vz0")]);
    let d = f.device(0);
    fill(d, 0..3000, PageKind::Heap);
    for i in (0..3000).step_by(2) {
        d.discard(i, 1).unwrap();
    }
    let freeable = f.store.freeable_pages();
    assert!(freeable > 0, "the test needs a fragmented pool");
    assert_eq!(f.store.pages_compacted(), 0);
    f.start(
        |c| c.policy.config.interval = Duration::from_millis(20),
        || {},
    );
    let mut c = f.client();
    // The policy's statistics are published after its pass: wait for them.
    wait_for("background compaction", || {
        c.call(&Stat {}).unwrap().policy.compacted_pages > 0
    });
    assert!(f.store.pages_compacted() > 0);
    assert!(f.store.freeable_pages() < freeable);
    for i in (1..3000).step_by(2) {
        check_page(f.device(0), i, PageKind::Heap);
    }
}

/// Below its fraction the pool is left alone, and with the policy off nothing runs at all;
/// `vzram policy on` starts it at run time.
#[test]
fn the_policy_waits_for_its_fraction_and_can_be_turned_on_and_off() {
    let mut f = Fixture::unstarted(&[dev("vz0")]);
    let d = f.device(0);
    fill(d, 0..1000, PageKind::Heap);
    for i in (0..1000).step_by(2) {
        d.discard(i, 1).unwrap();
    }
    let freeable = f.store.freeable_pages();
    assert!(freeable > 0);
    let used = f.store.pool_stats().pages_used;
    f.start(
        |c| {
            c.policy.config.interval = Duration::from_millis(5);
            // Just above what is freeable: nothing to do.
            c.policy.config.compact_fraction = (freeable as f64 + 1.0) / used as f64;
        },
        || {},
    );
    // Many passes (every 5 ms) in 200 ms.
    std::thread::sleep(Duration::from_millis(200));
    let mut c = f.client();
    let st = c.call(&Stat {}).unwrap();
    assert_eq!(st.store.pages_compacted, 0);
    assert_eq!(st.store.freeable_pages, freeable as u64);
    assert!(st.policy.ticks > 10, "{:?}", st.policy);
    // Off: no pass runs, whatever the fraction.
    let off = c
        .call(&Policy {
            enabled: Some(false),
            knobs: PolicyKnobs {
                compact_fraction: Some(0.0),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
    assert!(
        !off.config.enabled && off.config.compact_fraction == 0.0,
        "{off:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let ticks = c.call(&Stat {}).unwrap().policy.ticks;
    std::thread::sleep(Duration::from_millis(200));
    let st = c.call(&Stat {}).unwrap();
    assert_eq!((st.policy.ticks, st.store.pages_compacted), (ticks, 0));
    // On again, at run time: it compacts now.
    c.call(&Policy {
        enabled: Some(true),
        ..Default::default()
    })
    .unwrap();
    wait_for("compaction after `policy on`", || {
        c.call(&Stat {}).unwrap().store.pages_compacted > 0
    });
}

/// The policy by itself, end to end: cold pages are recompressed with the secondary
/// algorithm, and written back while the host reports memory pressure (a PSI file above the
/// threshold); with no pressure and no limit nothing is written back; the statistics say so.
#[test]
fn the_policy_recompresses_cold_pages_and_writes_back_under_pressure() {
    let mut f = Fixture::unstarted(&[DevSpec {
        backing: true,
        ..dev("vz0")
    }]);
    fill(f.device(0), 0..1000, PageKind::Heap);
    let psi = f.dir.0.join("pressure");
    std::fs::write(&psi, "some avg10=0.00 avg60=0.00 avg300=0.00 total=1\n").unwrap();
    f.start(
        |c| {
            c.policy.config.interval = Duration::from_millis(50);
            c.policy.config.idle_age = Duration::from_secs(1);
            c.policy.psi_file = psi.clone();
        },
        || {},
    );
    let mut c = f.client();
    wait_for("recompression of cold pages", || {
        c.call(&Stat {}).unwrap().devices[0].tiering.recompressed > 0
    });
    let st = c.call(&Stat {}).unwrap();
    assert_eq!(st.devices[0].bd_stat.bd_count, 0, "no pressure, no limit");
    assert_eq!(st.policy.last_psi, Some(0.0));
    // Pressure: writeback starts, a batch per pass.
    std::fs::write(&psi, "some avg10=42.50 avg60=10.00 avg300=1.00 total=99\n").unwrap();
    // The policy's statistics are published after its pass: wait for them, not the device's.
    wait_for("writeback under pressure", || {
        c.call(&Stat {}).unwrap().policy.devices[0].written_back > 0
    });
    let st = c.call(&Stat {}).unwrap();
    assert_eq!(st.policy.last_psi, Some(42.5));
    assert!(st.devices[0].bd_stat.bd_count > 0);
    let p = &st.policy.devices[0];
    assert!(p.written_back > 0 && p.recompressed > 0, "{p:?}");
    assert!(st.policy.cpu_secs > 0.0);
    // An unreadable PSI file: the policy goes on by the watermarks alone.
    std::fs::write(&psi, "garbage").unwrap();
    wait_for("the garbled file noticed", || {
        c.call(&Stat {}).unwrap().policy.last_psi.is_none()
    });
    for i in 0..1000 {
        check_page(f.device(0), i, PageKind::Heap);
    }
}

#[test]
fn policy_settings_are_checked_and_named() {
    let f = Fixture::new(&[dev("vz0")]);
    let mut raw = f.raw();
    let a = raw.ask(r#"{"cmd":"policy","high_watermark":0.5,"low_watermark":0.7}"#);
    assert!(error_of(&a).contains("low_watermark"), "{a}");
    let a = raw.ask(r#"{"cmd":"policy","idle_age":5}"#);
    assert!(error_of(&a).contains("\"idle_age\""), "{a}");
    let a = raw.ask(r#"{"cmd":"policy","idle_age_secs":"soon"}"#);
    assert_eq!(a["ok"], false, "{a}");
    // A refused change changes nothing.
    let a = raw.ask(r#"{"cmd":"policy"}"#);
    assert_eq!(a["result"]["config"]["high_watermark"], 0.9, "{a}");
    let a = raw.ask(r#"{"cmd":"policy","idle_age_secs":30,"high_watermark":0.95}"#);
    assert_eq!(a["ok"], true, "{a}");
    let st = f.client().call(&Stat {}).unwrap();
    assert_eq!(st.policy.config.idle_age, Duration::from_secs(30));
    assert_eq!(st.policy.config.high_watermark, 0.95);
    // The client renders what is in force.
    let text = printed(ClientCommand::Policy(Box::new(Call {
        args: Policy::default(),
        conn: f.conn(),
    })));
    assert!(text.starts_with("policy: off"), "{text}");
    assert!(text.contains("idle age 30s"), "{text}");
}

#[test]
fn sigterm_calls_the_shutdown_callback() {
    let mut f = Fixture::unstarted(&[dev("vz0")]);
    let (tx, rx) = mpsc::channel();
    f.start(|_| {}, move || tx.send(()).unwrap());
    let tid = f.handle.as_ref().unwrap().thread_id();
    // The test harness runs other threads that do not block SIGTERM, so the signal is sent
    // to the control thread alone (which blocks it and reads it from its signalfd).
    // SAFETY: tgkill has no memory-safety preconditions; the thread is alive until stop.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    rx.recv_timeout(DEADLINE).expect("shutdown callback");
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGINT) };
    assert_eq!(rc, 0);
    rx.recv_timeout(DEADLINE)
        .expect("shutdown callback for SIGINT");
    // The control plane keeps serving until the daemon stops it.
    assert!(f.client().call(&Stat {}).is_ok());
    f.handle.take().unwrap().stop().unwrap();
    assert!(!f.socket.exists());
}

#[test]
fn unreachable_socket_is_a_clear_error() {
    let dir = TempDir::new();
    let path = dir.0.join("none.ctl");
    let e = run_to(
        ClientCommand::Compact(Call {
            args: Compact {},
            conn: ControlArgs {
                control: Some(path.clone()),
                timeout: None,
            },
        }),
        &mut Vec::new(),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ClientError::Connect { .. }));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("VZRAM_CONTROL"), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn idle_clients_do_not_lock_the_operator_out() {
    // An idle timeout far beyond the test's length: every closing here is an eviction, even
    // on a loaded machine.
    let f = Fixture::with(&[dev("vz0")], |c| {
        c.idle_timeout = Duration::from_secs(600);
    });
    // More silent clients than the table holds (128).
    let mut idle: Vec<Raw> = (0..150).map(|_| f.raw()).collect();
    let start = Instant::now();
    let stat = f.client().call(&Stat {}).unwrap();
    assert_eq!(stat.devices.len(), 1);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "stat took {took:?}");
    assert!(
        printed(ClientCommand::Stat {
            format: StatFormat::Text,
            json: false,
            conn: f.conn()
        })
        .starts_with("NAME")
    );
    // The longest idle made room, oldest first: at least 150 - 128 of the silent clients,
    // and up to two more for the stat clients (each may leave before the next one comes).
    let mut evicted = 0;
    for (i, raw) in idle.iter_mut().enumerate() {
        // Eviction notices were sent before the stat clients got their answers.
        let wait = if i < 150 - 128 {
            TIMEOUT_SECS * 1000
        } else {
            20
        };
        let stream = raw.reader.get_ref();
        stream
            .set_read_timeout(Some(Duration::from_millis(wait)))
            .unwrap();
        let mut line = String::new();
        match raw.reader.read_line(&mut line) {
            Ok(_) => {
                assert_eq!(i, evicted, "evictions take the oldest first; client {i}");
                assert!(line.contains("closed to make room"), "client {i}: {line}");
                line.clear();
                assert_eq!(raw.reader.read_line(&mut line).unwrap(), 0, "then EOF");
                evicted += 1;
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "client {i}"),
        }
    }
    assert!(
        (150 - 128..=150 + 2 - 128).contains(&evicted),
        "{evicted} evicted"
    );
    // Those still in the table are served.
    let last = idle.last_mut().unwrap();
    last.reader.get_ref().set_read_timeout(None).unwrap();
    assert_eq!(last.ask(r#"{"cmd":"stat"}"#)["ok"], true);
}

#[test]
fn a_stalled_partial_line_is_dropped_after_the_idle_timeout() {
    let f = Fixture::with(&[dev("vz0")], |c| {
        c.policy.config.enabled = false;
        c.idle_timeout = Duration::from_millis(300);
    });
    let mut raw = f.raw();
    let start = Instant::now();
    assert_eq!(raw.ask(r#"{"cmd":"stat"}"#)["ok"], true);
    raw.send(br#"{"cmd":"st"#);
    let a = raw.answer();
    let took = start.elapsed();
    assert!(
        error_of(&a).contains("no complete request for 0.3 s"),
        "{a}"
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let mut rest = Vec::new();
    raw.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed");
    // A client that says nothing at all goes the same way.
    let mut silent = f.raw();
    assert!(error_of(&silent.answer()).contains("no complete request"));
    assert!(f.client().call(&Stat {}).is_ok());
}

#[test]
fn a_client_that_never_reads_does_not_block_others() {
    let f = Fixture::with(&[dev("vz0")], |c| {
        c.policy.config.enabled = false;
        c.write_timeout = Duration::from_millis(500);
    });
    let greedy = UnixStream::connect(&f.socket).unwrap();
    let mut w = greedy.try_clone().unwrap();
    // Stat answers (about 2 KiB each) it never reads; the write blocks once the daemon
    // stops reading, and fails once the daemon gives up on it.
    let writer = std::thread::spawn(move || {
        let batch = b"{\"cmd\":\"stat\"}\n".repeat(100_000);
        w.write_all(&batch).is_err()
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut c = f.client();
    for _ in 0..20 {
        let start = Instant::now();
        assert!(c.call(&Stat {}).is_ok());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
    wait_for("the greedy client to be closed", || writer.is_finished());
    assert!(writer.join().unwrap(), "its writes fail once it is closed");
    drop(greedy);
    assert!(c.call(&Stat {}).is_ok());
}

/// A device with enough text pages, all idle, that recompressing it takes seconds.
fn long_recompression(on_shutdown: impl FnMut() + Send + 'static) -> Fixture {
    let mut f = Fixture::unstarted(&[DevSpec {
        pages: 32768,
        ..dev("vz0")
    }]);
    fill(f.device(0), 0..32768, PageKind::Text);
    f.device(0).mark_idle(None);
    f.start(|c| c.policy.config.enabled = false, on_shutdown);
    f
}

/// Starts `vzram recompress` on its own client; returns once the pass is under way.
fn start_recompress(
    f: &Fixture,
) -> std::thread::JoinHandle<Result<Devices<RecompressDevice>, ClientError>> {
    let before = f.device(0).stats().mm_stat.compr_data_size;
    let mut c = f.client();
    let t = std::thread::spawn(move || {
        c.call(&Recompress {
            device: None,
            page_type: PageType::Idle,
            threshold: None,
            max_pages: None,
            priority: None,
        })
    });
    wait_for("the recompression to start", || {
        f.device(0).stats().mm_stat.compr_data_size < before
    });
    t
}

fn check_text(f: &Fixture, pages: u64) {
    for i in 0..pages {
        check_page(f.device(0), i, PageKind::Text);
    }
}

#[test]
fn stat_answers_and_stop_is_prompt_during_a_long_recompression() {
    let mut f = long_recompression(|| {});
    let pass = start_recompress(&f);
    let start = Instant::now();
    let st = f.client().call(&Stat {}).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(st.devices.len(), 1);
    assert!(!pass.is_finished(), "the test needs a longer recompression");

    let start = Instant::now();
    f.handle.take().unwrap().stop().unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
    // Its connection is closed: no answer, or the reason it stopped.
    match pass.join().unwrap() {
        Err(ClientError::Closed) | Err(ClientError::Io { .. }) => {}
        Err(ClientError::Server(m)) => assert!(m.contains("shutting down"), "{m}"),
        other => panic!("{other:?}"),
    }
    check_text(&f, 32768);
}

#[test]
fn a_shutdown_signal_ends_a_long_recompression() {
    let (tx, rx) = mpsc::channel();
    let f = long_recompression(move || tx.send(()).unwrap());
    let pass = start_recompress(&f);
    let start = Instant::now();
    let tid = f.handle.as_ref().unwrap().thread_id();
    // SAFETY: tgkill has no memory-safety preconditions; the thread is alive until stop.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    rx.recv_timeout(Duration::from_secs(2))
        .expect("the shutdown callback within 2 s");
    let e = pass.join().unwrap().unwrap_err();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the pass ended after {took:?}"
    );
    assert!(
        e.to_string()
            .starts_with("stopped: the daemon is shutting down (recompression stopped after"),
        "{e}"
    );
    // Maintenance does nothing from now on; the rest still answers.
    let e = f
        .client()
        .call(&Recompress {
            device: None,
            page_type: PageType::Idle,
            threshold: None,
            max_pages: None,
            priority: None,
        })
        .unwrap_err();
    assert!(e.to_string().contains("stopped after 0 pages tried"), "{e}");
    assert!(f.client().call(&Stat {}).is_ok());
    check_text(&f, 32768);
}

#[test]
fn limit_zero_still_prints_a_line_per_device() {
    let f = Fixture::new(&[
        DevSpec {
            backing: true,
            ..dev("vz0")
        },
        DevSpec {
            backing: true,
            ..dev("vz1")
        },
    ]);
    fill(f.device(0), 0..10, PageKind::Heap);
    f.device(0).mark_idle(None);
    let text = printed(ClientCommand::Writeback(Call {
        args: Writeback {
            device: None,
            page_type: PageType::Idle,
            limit_pages: Some(0),
        },
        conn: f.conn(),
    }));
    assert_eq!(
        text,
        "vz0: 0 pages written back (0B)\nvz1: 0 pages written back (0B)\n"
    );
    let text = printed(ClientCommand::Recompress(Call {
        args: Recompress {
            device: Some("vz1".into()),
            page_type: PageType::Idle,
            threshold: None,
            max_pages: Some(0),
            priority: Some(1),
        },
        conn: f.conn(),
    }));
    assert_eq!(text, "vz1: 0 pages tried, 0 recompressed\n");
    // A spent limit lists the rest with 0.
    let text = printed(ClientCommand::Writeback(Call {
        args: Writeback {
            device: None,
            page_type: PageType::Idle,
            limit_pages: Some(4),
        },
        conn: f.conn(),
    }));
    assert_eq!(
        text,
        "vz0: 4 pages written back (16K)\nvz1: 0 pages written back (0B)\n"
    );
    assert_eq!(f.device(0).stats().bd_stat.bd_count, 4);
}

#[test]
fn a_daemon_without_devices_still_answers_every_command_with_a_line() {
    let f = Fixture::new(&[]);
    for (cmd, want) in [
        (
            ClientCommand::Writeback(Call {
                args: Writeback {
                    device: None,
                    page_type: PageType::Idle,
                    limit_pages: Some(0),
                },
                conn: f.conn(),
            }),
            "writeback: no device\n",
        ),
        (
            ClientCommand::Recompress(Call {
                args: Recompress {
                    device: None,
                    page_type: PageType::Idle,
                    threshold: None,
                    max_pages: None,
                    priority: Some(1),
                },
                conn: f.conn(),
            }),
            "recompress: no device\n",
        ),
        (
            ClientCommand::Idle(Call {
                args: Idle {
                    age_secs: None,
                    device: None,
                },
                conn: f.conn(),
            }),
            "idle: no device\n",
        ),
    ] {
        assert_eq!(printed(cmd), want);
    }
}

#[test]
fn duplicate_keys_are_refused() {
    let f = Fixture::new(&[dev("vz0")]);
    fill(f.device(0), 0..2000, PageKind::Heap);
    for i in (0..2000).step_by(2) {
        f.device(0).discard(i, 1).unwrap();
    }
    let freeable = f.store.freeable_pages();
    assert!(freeable > 0);
    let mut raw = f.raw();
    let a = raw.ask(r#"{"cmd":"stat","cmd":"compact"}"#);
    assert!(error_of(&a).contains(r#"duplicate key "cmd""#), "{a}");
    let a = raw.ask(r#"{"cmd":"mem_limit","bytes":4096,"bytes":0}"#);
    assert!(error_of(&a).contains(r#"duplicate key "bytes""#), "{a}");
    // Nothing ran.
    assert_eq!(f.store.freeable_pages(), freeable);
    assert_eq!(f.store.pages_compacted(), 0);
    assert_eq!(f.store.mem_limit(), 0);
    // Bad bytes are errors too, on a connection that keeps going.
    raw.send(b"{\"cmd\":\"st\xffat\"}\n{\"cmd\":\"stat\",\"id\":\"ok\"}\n");
    assert!(error_of(&raw.answer()).starts_with("malformed JSON"));
    assert_eq!(raw.answer()["id"], "ok");
}
