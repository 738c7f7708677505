//! `vzram stat` for people: a zramctl-like table, then each device's zram statistics under
//! zram's names, its queues, and the store.

use crate::control::proto::{DeviceStat, StatReply, StoreStat};
use std::fmt::Write;
use zram::policy::PolicyStats;

/// Text wider than this is wrapped (the statistics grids).
const WIDTH: usize = 100;

/// A size the way zramctl prints it (util-linux `size_to_human_string`): powers of 1024, one
/// letter, at most one decimal rounded to nearest: `0B`, `1023B`, `4K`, `1.5K`, `1.2G`, `4G`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [char; 7] = ['B', 'K', 'M', 'G', 'T', 'P', 'E'];
    let exp = (10..=60)
        .step_by(10)
        .find(|&shift| bytes < 1u64 << shift)
        .unwrap_or(70)
        - 10;
    let unit = UNITS[exp / 10];
    let mut whole = bytes >> exp;
    let rest = bytes & ((1u64 << exp) - 1);
    // Thousandths of the unit, then rounded to a tenth.
    let thousandths = if rest == 0 {
        0
    } else if rest >= u64::MAX / 1000 {
        (rest / 1024 * 1000) >> (exp - 10)
    } else {
        (rest * 1000) >> exp
    };
    let mut tenths = (thousandths + 50) / 100;
    if tenths == 10 {
        whole += 1;
        tenths = 0;
    }
    if tenths == 0 {
        format!("{whole}{unit}")
    } else {
        format!("{whole}.{tenths}{unit}")
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Columns separated by one space, each as wide as its widest cell; no trailing spaces.
fn table(out: &mut String, indent: &str, head: &[(&str, Align)], rows: &[Vec<String>]) {
    let widths: Vec<usize> = head
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let header: Vec<String> = head.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = indent.to_string();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            match head[i].1 {
                Align::Left => write!(line, "{cell:<w$}", w = widths[i]),
                Align::Right => write!(line, "{cell:>w$}", w = widths[i]),
            }
            .expect("writing to a String");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// zram's fields under their names: a header row with the values right-aligned under it,
/// wrapped into several header/value rows when wider than [`WIDTH`].
fn grid(out: &mut String, label: &str, fields: &[(&str, u64)]) {
    const LABEL: usize = 11;
    let cells: Vec<(String, String, usize)> = fields
        .iter()
        .map(|(name, v)| {
            let v = v.to_string();
            let w = name.len().max(v.len());
            (name.to_string(), v, w)
        })
        .collect();
    let mut first = true;
    let mut rest = &cells[..];
    while !rest.is_empty() {
        let mut width = LABEL;
        let mut n = 0;
        while n < rest.len() && (n == 0 || width + 1 + rest[n].2 <= WIDTH) {
            width += rest[n].2 + usize::from(n > 0);
            n += 1;
        }
        let (row, more) = rest.split_at(n);
        let lead = if first { label } else { "" };
        let mut names = format!("  {lead:<w$}", w = LABEL - 2);
        let mut values = " ".repeat(LABEL);
        for (i, (name, v, w)) in row.iter().enumerate() {
            let sep = if i > 0 { " " } else { "" };
            write!(names, "{sep}{name:>w$}").expect("writing to a String");
            write!(values, "{sep}{v:>w$}").expect("writing to a String");
        }
        writeln!(out, "{}\n{}", names.trim_end(), values.trim_end()).expect("writing to a String");
        first = false;
        rest = more;
    }
}

fn limit(bytes: u64) -> String {
    if bytes == 0 {
        "none".into()
    } else {
        human_size(bytes)
    }
}

/// The whole `vzram stat` text.
pub fn render(stat: &StatReply) -> String {
    use Align::{Left, Right};
    let mut out = String::new();
    let rows: Vec<Vec<String>> = stat
        .devices
        .iter()
        .map(|d| {
            let mm = &d.mm_stat;
            vec![
                d.name.clone(),
                human_size(d.disksize),
                human_size(mm.orig_data_size),
                human_size(mm.compr_data_size),
                human_size(mm.mem_used_total),
                d.comp_algorithm.clone(),
                d.streams.to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        "",
        &[
            ("NAME", Left),
            ("DISKSIZE", Right),
            ("DATA", Right),
            ("COMPR", Right),
            ("TOTAL", Right),
            ("ALGORITHM", Left),
            ("STREAMS", Right),
        ],
        &rows,
    );
    for d in &stat.devices {
        out.push('\n');
        device(&mut out, d);
    }
    out.push('\n');
    store(&mut out, &stat.store, stat.devices.len());
    out.push('\n');
    out.push_str(&policy(&stat.policy));
    out
}

fn device(out: &mut String, d: &DeviceStat) {
    let state = if d.connected {
        "connected"
    } else {
        "not connected"
    };
    let plural = if d.connections == 1 { "" } else { "s" };
    let mode = if d.readonly { ", read-only" } else { "" };
    writeln!(
        out,
        "{}: {state} ({} connection{plural} so far), socket {}{mode}",
        d.name, d.connections, d.socket
    )
    .expect("writing to a String");
    if !d.recomp_algorithms.is_empty() {
        let algos: Vec<String> = d
            .recomp_algorithms
            .iter()
            .map(|a| format!("{} (priority {})", a.algorithm, a.priority))
            .collect();
        writeln!(out, "  recompression: {}", algos.join(", ")).expect("writing to a String");
    }
    let mm = &d.mm_stat;
    grid(
        out,
        "mm_stat",
        &[
            ("orig_data_size", mm.orig_data_size),
            ("compr_data_size", mm.compr_data_size),
            ("mem_used_total", mm.mem_used_total),
            ("mem_limit", mm.mem_limit),
            ("mem_used_max", mm.mem_used_max),
            ("same_pages", mm.same_pages),
            ("pages_compacted", mm.pages_compacted),
            ("huge_pages", mm.huge_pages),
            ("huge_pages_since", mm.huge_pages_since),
        ],
    );
    let io = &d.io_stat;
    grid(
        out,
        "io_stat",
        &[
            ("failed_reads", io.failed_reads),
            ("failed_writes", io.failed_writes),
            ("invalid_io", io.invalid_io),
            ("notify_free", io.notify_free),
        ],
    );
    let bd = &d.bd_stat;
    grid(
        out,
        "bd_stat",
        &[
            ("bd_count", bd.bd_count),
            ("bd_reads", bd.bd_reads),
            ("bd_writes", bd.bd_writes),
        ],
    );
    let m = &d.memory;
    writeln!(
        out,
        "  memory: {} in use, limit {}, share of the store's limit {}",
        human_size(m.used),
        limit(m.limit),
        limit(m.share)
    )
    .expect("writing to a String");
    let t = &d.tiering;
    grid(
        out,
        "tiering",
        &[
            ("recompressed", t.recompressed),
            ("written_back", t.written_back),
            ("direct_reclaimed", t.direct_reclaimed),
            ("direct_reclaim_failed", t.direct_reclaim_failed),
            ("promoted", t.promoted),
        ],
    );
    use Align::Right;
    // A device offers many queues (QEMU uses one per vCPU); list the ones that carried I/O.
    let rows: Vec<Vec<String>> = d
        .queues
        .iter()
        .enumerate()
        .filter(|(_, q)| q.requests > 0)
        .map(|(i, q)| {
            vec![
                i.to_string(),
                q.requests.to_string(),
                q.reads.to_string(),
                q.writes.to_string(),
                q.flushes.to_string(),
                q.discards.to_string(),
                q.write_zeroes.to_string(),
                q.get_ids.to_string(),
                human_size(q.read_bytes),
                human_size(q.write_bytes),
                q.io_errors.to_string(),
                q.unsupported.to_string(),
            ]
        })
        .collect();
    table(
        out,
        "  ",
        &[
            ("QUEUE", Right),
            ("REQUESTS", Right),
            ("READS", Right),
            ("WRITES", Right),
            ("FLUSHES", Right),
            ("DISCARDS", Right),
            ("WZEROES", Right),
            ("GET_ID", Right),
            ("READ", Right),
            ("WRITTEN", Right),
            ("IOERR", Right),
            ("UNSUPP", Right),
        ],
        &rows,
    );
    let idle = d.queues.len() - rows.len();
    if idle > 0 {
        writeln!(
            out,
            "  ({idle} of {} queues have had no requests)",
            d.queues.len()
        )
        .unwrap();
    }
}

fn store(out: &mut String, s: &StoreStat, devices: usize) {
    writeln!(
        out,
        "store: mem_limit {}, mem_used_total {}, mem_used_max {},\n  \
         pages_compacted {}, freeable now {} pages",
        limit(s.mem_limit),
        human_size(s.mem_used_total),
        human_size(s.mem_used_max),
        s.pages_compacted,
        s.freeable_pages
    )
    .expect("writing to a String");
    if devices > 1 {
        out.push_str("(TOTAL and mm_stat's mem_* and pages_compacted are the shared store's)\n");
    }
}

/// The policy's settings and what it did (`vzram policy`, and the end of `vzram stat`).
pub fn policy(p: &PolicyStats) -> String {
    use Align::{Left, Right};
    let c = &p.config;
    let pct = |f: f64| format!("{}%", (f * 1000.0).round() / 10.0);
    let secs = |d: std::time::Duration| human_secs(d.as_secs_f64());
    let mut out = String::new();
    let psi = match p.last_psi {
        Some(v) => format!("{v:.2}"),
        None => "unavailable".into(),
    };
    writeln!(
        out,
        "policy: {}, every {}; idle age {} (up to {} under back-off); recompress {}\n  \
         compact above {} freeable; write back above {} of a limit, down to {},\n  \
         or while PSI some avg10 > {}% (last: {psi})\n  \
         promotion target {} of recently used pages per minute; {} pages per action and pass",
        if c.enabled { "on" } else { "off" },
        secs(c.interval),
        secs(c.idle_age),
        secs(c.max_cold_age),
        if c.recompress { "on" } else { "off" },
        pct(c.compact_fraction),
        pct(c.high_watermark),
        pct(c.low_watermark),
        c.psi_threshold,
        pct(c.promotion_target),
        c.max_pages_per_tick,
    )
    .expect("writing to a String");
    writeln!(
        out,
        "  {} passes, {:.2} s CPU, {} pages compacted{}, {} errors{}",
        p.ticks,
        p.cpu_secs,
        p.compacted_pages,
        if p.reclaiming {
            ", writing back to the low watermark"
        } else {
            ""
        },
        p.errors,
        match &p.last_error {
            Some(e) => format!(" (last: {e})"),
            None => String::new(),
        }
    )
    .expect("writing to a String");
    let rows: Vec<Vec<String>> = p
        .devices
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.recompressed.to_string(),
                d.written_back.to_string(),
                human_size(d.freed_bytes),
                format!("{:.1}", d.promotions_per_min),
                format!("{:.1}", d.promotion_target_per_min),
                human_secs(d.cold_age_secs),
                if d.throttled { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(
            &mut out,
            "  ",
            &[
                ("DEVICE", Left),
                ("RECOMPRESSED", Right),
                ("WRITTEN_BACK", Right),
                ("FREED", Right),
                ("PROMOTED/MIN", Right),
                ("TARGET/MIN", Right),
                ("COLD_AGE", Right),
                ("THROTTLED", Left),
            ],
            &rows,
        );
    }
    out
}

/// Seconds as the ages the command line takes: `45s`, `2m`, `1.5h`, `2d`.
fn human_secs(secs: f64) -> String {
    let (n, unit) = [(86400.0, "d"), (3600.0, "h"), (60.0, "m")]
        .into_iter()
        .find(|&(u, _)| secs >= u)
        .map_or((secs, "s"), |(u, name)| (secs / u, name));
    let n = (n * 10.0).round() / 10.0;
    if n.fract() == 0.0 {
        format!("{}{unit}", n as u64)
    } else {
        format!("{n}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::RecompAlgorithm;
    use crate::counters::RequestStats;

    #[test]
    fn sizes_like_zramctl() {
        let cases: &[(u64, &str)] = &[
            (0, "0B"),
            (1, "1B"),
            (1023, "1023B"),
            (1024, "1K"),
            (1536, "1.5K"),
            (4096, "4K"),
            (512 << 20, "512M"),
            (4 << 30, "4G"),
            ((12 << 30) / 10, "1.2G"),
            ((1 << 30) + (1 << 30) / 25, "1G"), // 1.04G rounds down
            ((1 << 30) + (1 << 30) / 19, "1.1G"), // 1.053G rounds up
            ((1 << 20) * 1023 + (1 << 20) * 96 / 100, "1024M"), // 1023.96M: as util-linux
            (1 << 40, "1T"),
            (u64::MAX, "16E"),
        ];
        for &(bytes, want) in cases {
            assert_eq!(human_size(bytes), want, "{bytes}");
        }
    }

    fn device(name: &str, data: u64) -> DeviceStat {
        DeviceStat {
            disksize: 4 << 30,
            comp_algorithm: "lz4".into(),
            mm_stat: zram::MmStat {
                orig_data_size: data,
                compr_data_size: data / 3,
                mem_used_total: 427417600,
                huge_pages: 8047,
                ..Default::default()
            },
            name: name.into(),
            socket: format!("/run/vzram/{name}.sock"),
            connected: true,
            connections: 1,
            readonly: false,
            streams: 2,
            recomp_algorithms: vec![RecompAlgorithm {
                priority: 1,
                algorithm: "zstd:9".into(),
            }],
            queues: vec![
                RequestStats {
                    requests: 1234,
                    reads: 600,
                    writes: 634,
                    read_bytes: 600 * 4096,
                    ..Default::default()
                },
                RequestStats::default(),
            ],
            ..Default::default()
        }
    }

    fn stat() -> StatReply {
        StatReply {
            devices: vec![device("vz0", 1 << 30), device("swap-long-name", 0)],
            store: StoreStat {
                mem_limit: 2 << 30,
                mem_used_total: 427417600,
                mem_used_max: 500 << 20,
                pages_compacted: 7,
                freeable_pages: 3,
                pool: Default::default(),
            },
            policy: Default::default(),
        }
    }

    /// The column (byte offset) where `word` ends in `line`.
    fn end_of(line: &str, word: &str) -> usize {
        line.find(word)
            .unwrap_or_else(|| panic!("{word} in {line:?}"))
            + word.len()
    }

    #[test]
    fn table_layout() {
        let text = render(&stat());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAME           DISKSIZE DATA  COMPR  TOTAL ALGORITHM STREAMS"
        );
        assert_eq!(
            lines[1],
            "vz0                  4G   1G 341.3M 407.6M lz4             2"
        );
        assert_eq!(
            lines[2],
            "swap-long-name       4G   0B     0B 407.6M lz4             2"
        );
        assert!(text.lines().all(|l| l == l.trim_end()), "trailing spaces");
        assert!(text.lines().all(|l| l.len() <= WIDTH), "{text}");
        assert!(text.contains("vz0: connected (1 connection so far), socket /run/vzram/vz0.sock"));
        assert!(text.contains("  recompression: zstd:9 (priority 1)"));
        assert!(text.contains("store: mem_limit 2G, mem_used_total 407.6M, mem_used_max 500M"));
        assert!(text.contains("are the shared store's"));
    }

    #[test]
    fn stat_values_sit_under_their_names() {
        let text = render(&stat());
        let lines: Vec<&str> = text.lines().collect();
        // `value` ends in the row under `name` where `name` ends, after a space.
        let check = |name: &str, value: &str| {
            let i = lines
                .iter()
                .position(|l| l.split_whitespace().any(|w| w == name))
                .unwrap_or_else(|| panic!("{name} in\n{text}"));
            let end = end_of(lines[i], name);
            let under = lines[i + 1].get(..end).unwrap_or("");
            assert!(
                under.ends_with(&format!(" {value}")),
                "{name} = {value}:\n{}\n{}",
                lines[i],
                lines[i + 1]
            );
        };
        // mm_stat is wrapped onto two header/value rows; each value is right-aligned under
        // its name.
        check("orig_data_size", "1073741824");
        check("compr_data_size", "357913941");
        check("mem_used_total", "427417600");
        check("huge_pages", "8047");
        check("failed_reads", "0");
        check("bd_writes", "0");
        let mm = lines
            .iter()
            .position(|l| l.starts_with("  mm_stat"))
            .unwrap();
        assert!(lines[mm + 2].trim_start().starts_with("pages_compacted"));
        // The queue table: one row per queue that carried I/O, counts right-aligned.
        let q = lines
            .iter()
            .position(|l| l.contains("QUEUE REQUESTS"))
            .unwrap();
        assert_eq!(end_of(lines[q], "REQUESTS"), end_of(lines[q + 1], "1234"));
        assert_eq!(end_of(lines[q], "READ "), end_of(lines[q + 1], "2.3M") + 1);
        assert_eq!(lines[q + 1].split_whitespace().count(), 12);
        assert_eq!(lines[q + 2].trim(), "(1 of 2 queues have had no requests)");
    }

    #[test]
    fn one_device_has_no_shared_store_note() {
        let mut s = stat();
        s.devices.truncate(1);
        s.store.mem_limit = 0;
        let text = render(&s);
        assert!(!text.contains("shared store"));
        assert!(text.contains("mem_limit none"));
    }
}
