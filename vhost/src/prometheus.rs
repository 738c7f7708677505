//! `vzram stat --format prometheus`: the statistics in Prometheus' text exposition format
//! (version 0.0.4), for node_exporter's textfile collector or any scraper that reads a file.
//!
//! Names keep zram's (`vzram_orig_data_size_bytes` is mm_stat's `orig_data_size`), with the
//! unit suffixes Prometheus asks for: `_bytes`, `_pages`, and `_total` on counters. Per-device
//! series carry a `device` label (the `name=` of `--device`); the store's have none.

use crate::control::proto::{DeviceStat, StatReply};
use std::fmt::Write;
use zram::policy::DevicePolicyStats;

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// One metric family: its samples follow its HELP and TYPE lines, as the format requires.
struct Family<'a> {
    out: &'a mut String,
}

fn family<'a>(out: &'a mut String, name: &str, kind: Kind, help: &str) -> Family<'a> {
    let kind = match kind {
        Kind::Gauge => "gauge",
        Kind::Counter => "counter",
    };
    writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}").expect("writing to a String");
    Family { out }
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                write!(self.out, "{k}=\"{}\"", escape(v)).expect("writing to a String");
            }
            self.out.push('}');
        }
        writeln!(self.out, " {value}").expect("writing to a String");
    }
}

/// A label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type DeviceField = fn(&DeviceStat) -> u64;
type PolicyField = fn(&DevicePolicyStats) -> f64;

/// Per-device series: name, kind, help, value.
const DEVICE: &[(&str, Kind, &str, DeviceField)] = &[
    (
        "vzram_disksize_bytes",
        Kind::Gauge,
        "Size of the disk (zram's disksize).",
        |d| d.disksize,
    ),
    (
        "vzram_connected",
        Kind::Gauge,
        "1 while a vhost-user frontend is connected.",
        |d| d.connected as u64,
    ),
    (
        "vzram_connections_total",
        Kind::Counter,
        "vhost-user connections accepted.",
        |d| d.connections,
    ),
    (
        "vzram_orig_data_size_bytes",
        Kind::Gauge,
        "Uncompressed size of the data stored (mm_stat orig_data_size).",
        |d| d.mm_stat.orig_data_size,
    ),
    (
        "vzram_compr_data_size_bytes",
        Kind::Gauge,
        "Compressed size of the data in memory (mm_stat compr_data_size).",
        |d| d.mm_stat.compr_data_size,
    ),
    (
        "vzram_same_pages",
        Kind::Gauge,
        "Pages stored as one repeated word, without memory (mm_stat same_pages).",
        |d| d.mm_stat.same_pages,
    ),
    (
        "vzram_huge_pages",
        Kind::Gauge,
        "Pages stored uncompressed (mm_stat huge_pages).",
        |d| d.mm_stat.huge_pages,
    ),
    (
        "vzram_huge_pages_since_total",
        Kind::Counter,
        "Pages stored uncompressed since the device was made (mm_stat huge_pages_since).",
        |d| d.mm_stat.huge_pages_since,
    ),
    (
        "vzram_failed_reads_total",
        Kind::Counter,
        "Reads that failed (io_stat failed_reads).",
        |d| d.io_stat.failed_reads,
    ),
    (
        "vzram_failed_writes_total",
        Kind::Counter,
        "Writes that failed, e.g. at the memory limit (io_stat failed_writes).",
        |d| d.io_stat.failed_writes,
    ),
    (
        "vzram_invalid_io_total",
        Kind::Counter,
        "Requests refused as out of range or misaligned (io_stat invalid_io).",
        |d| d.io_stat.invalid_io,
    ),
    (
        "vzram_notify_free_total",
        Kind::Counter,
        "Pages freed by discard (io_stat notify_free).",
        |d| d.io_stat.notify_free,
    ),
    (
        "vzram_bd_count_pages",
        Kind::Gauge,
        "Pages in the backing file now (bd_stat bd_count).",
        |d| d.bd_stat.bd_count,
    ),
    (
        "vzram_bd_reads_total",
        Kind::Counter,
        "Pages read back from the backing file (bd_stat bd_reads).",
        |d| d.bd_stat.bd_reads,
    ),
    (
        "vzram_bd_writes_total",
        Kind::Counter,
        "Pages written to the backing file (bd_stat bd_writes).",
        |d| d.bd_stat.bd_writes,
    ),
    (
        "vzram_reads_total",
        Kind::Counter,
        "Read requests served.",
        |d| d.reads,
    ),
    (
        "vzram_writes_total",
        Kind::Counter,
        "Write requests served.",
        |d| d.writes,
    ),
    (
        "vzram_read_bytes_total",
        Kind::Counter,
        "Bytes read by the guest.",
        |d| d.read_bytes,
    ),
    (
        "vzram_written_bytes_total",
        Kind::Counter,
        "Bytes written by the guest.",
        |d| d.write_bytes,
    ),
    (
        "vzram_io_errors_total",
        Kind::Counter,
        "Requests completed with an I/O error.",
        |d| d.queues.iter().map(|q| q.io_errors).sum(),
    ),
    (
        "vzram_mem_used_bytes",
        Kind::Gauge,
        "The device's memory: its compressed bytes and its part of the pool's overhead.",
        |d| d.memory.used,
    ),
    (
        "vzram_mem_limit_bytes",
        Kind::Gauge,
        "The device's own memory limit; 0 = only the store's.",
        |d| d.memory.limit,
    ),
    (
        "vzram_mem_share_bytes",
        Kind::Gauge,
        "The device's fair share of the store's limit; 0 = no limit.",
        |d| d.memory.share,
    ),
    (
        "vzram_recompressed_pages_total",
        Kind::Counter,
        "Pages kept in a smaller form by recompression.",
        |d| d.tiering.recompressed,
    ),
    (
        "vzram_direct_reclaimed_pages_total",
        Kind::Counter,
        "Pages moved to the backing file by writes at a memory limit (direct reclaim).",
        |d| d.tiering.direct_reclaimed,
    ),
    (
        "vzram_direct_reclaim_failed_total",
        Kind::Counter,
        "Writes that failed at a limit with nothing cold left to move.",
        |d| d.tiering.direct_reclaim_failed,
    ),
];

/// Per-device series of the policy: name, kind, help, value.
const POLICY_DEVICE: &[(&str, Kind, &str, PolicyField)] = &[
    (
        "vzram_policy_recompressed_pages_total",
        Kind::Counter,
        "Pages the policy recompressed into a smaller form.",
        |d| d.recompressed as f64,
    ),
    (
        "vzram_policy_written_back_pages_total",
        Kind::Counter,
        "Pages the policy wrote back to the backing file.",
        |d| d.written_back as f64,
    ),
    (
        "vzram_policy_promotions_per_minute",
        Kind::Gauge,
        "Pages read back from the backing file in the last minute.",
        |d| d.promotions_per_min,
    ),
    (
        "vzram_policy_promotion_target_per_minute",
        Kind::Gauge,
        "The most promotions per minute before the device's writeback backs off.",
        |d| d.promotion_target_per_min,
    ),
    (
        "vzram_policy_cold_age_seconds",
        Kind::Gauge,
        "Pages not accessed for this long are cold on this device (grows under back-off).",
        |d| d.cold_age_secs,
    ),
    (
        "vzram_policy_throttled",
        Kind::Gauge,
        "1 while the device's promotions are above target and its writeback is held back.",
        |d| f64::from(u8::from(d.throttled)),
    ),
];

/// The whole reply as a Prometheus text file.
pub fn render(stat: &StatReply) -> String {
    let mut out = String::new();
    for &(name, kind, help, value) in DEVICE {
        let mut f = family(&mut out, name, kind, help);
        for d in &stat.devices {
            f.sample(name, &[("device", &d.name)], value(d) as f64);
        }
    }
    let p = &stat.policy;
    for &(name, kind, help, value) in POLICY_DEVICE {
        let mut f = family(&mut out, name, kind, help);
        for d in &p.devices {
            f.sample(name, &[("device", &d.name)], value(d));
        }
    }
    let s = &stat.store;
    let store: [(&str, Kind, &str, u64); 7] = [
        (
            "vzram_store_mem_limit_bytes",
            Kind::Gauge,
            "The store's memory limit; 0 = none (mm_stat mem_limit).",
            s.mem_limit,
        ),
        (
            "vzram_store_mem_used_total_bytes",
            Kind::Gauge,
            "Memory the shared pool holds, allocator overhead included (mm_stat mem_used_total).",
            s.mem_used_total,
        ),
        (
            "vzram_store_mem_used_max_bytes",
            Kind::Gauge,
            "Most memory the pool has held since the last reset (mm_stat mem_used_max).",
            s.mem_used_max,
        ),
        (
            "vzram_store_pages_compacted_total",
            Kind::Counter,
            "Pages freed by compaction (mm_stat pages_compacted).",
            s.pages_compacted,
        ),
        (
            "vzram_store_freeable_pages",
            Kind::Gauge,
            "Pages compaction could free now.",
            s.freeable_pages,
        ),
        (
            "vzram_store_objects",
            Kind::Gauge,
            "Compressed objects the allocator holds.",
            s.pool.objects as u64,
        ),
        (
            "vzram_store_metadata_bytes",
            Kind::Gauge,
            "Memory of the allocator's own tables.",
            s.pool.metadata_bytes as u64,
        ),
    ];
    for (name, kind, help, value) in store {
        family(&mut out, name, kind, help).sample(name, &[], value as f64);
    }
    let c = &p.config;
    let mut policy = vec![
        (
            "vzram_policy_enabled",
            Kind::Gauge,
            "1 while the tiering policy runs.",
            f64::from(u8::from(p.config.enabled)),
        ),
        (
            "vzram_policy_passes_total",
            Kind::Counter,
            "Passes the policy has made.",
            p.ticks as f64,
        ),
        (
            "vzram_policy_cpu_seconds_total",
            Kind::Counter,
            "CPU time the policy's passes took.",
            p.cpu_secs,
        ),
        (
            "vzram_policy_compacted_pages_total",
            Kind::Counter,
            "Pool pages freed by the policy's compactions.",
            p.compacted_pages as f64,
        ),
        (
            "vzram_policy_errors_total",
            Kind::Counter,
            "Policy operations that failed.",
            p.errors as f64,
        ),
        (
            "vzram_policy_idle_age_seconds",
            Kind::Gauge,
            "Setting: pages not accessed for this long are cold.",
            c.idle_age.as_secs_f64(),
        ),
        (
            "vzram_policy_high_watermark_ratio",
            Kind::Gauge,
            "Setting: writeback starts above this fraction of a memory limit.",
            c.high_watermark,
        ),
        (
            "vzram_policy_low_watermark_ratio",
            Kind::Gauge,
            "Setting: writeback stops at this fraction of a memory limit.",
            c.low_watermark,
        ),
    ];
    if let Some(psi) = p.last_psi {
        policy.push((
            "vzram_policy_psi_some_avg10",
            Kind::Gauge,
            "Host memory pressure the policy last read (PSI some avg10, percent).",
            psi,
        ));
    }
    for (name, kind, help, value) in policy {
        family(&mut out, name, kind, help).sample(name, &[], value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::StoreStat;
    use std::collections::{HashMap, HashSet};

    fn reply() -> StatReply {
        let dev = |name: &str, orig| DeviceStat {
            name: name.into(),
            disksize: 1 << 30,
            mm_stat: zram::MmStat {
                orig_data_size: orig,
                ..Default::default()
            },
            ..Default::default()
        };
        StatReply {
            devices: vec![dev("vm1", 4096), dev("odd \"name\\\n", 8192)],
            store: StoreStat {
                mem_limit: 64 << 20,
                mem_used_total: 12288,
                mem_used_max: 16384,
                pages_compacted: 3,
                freeable_pages: 1,
                pool: Default::default(),
            },
            policy: zram::policy::PolicyStats {
                cpu_secs: 0.25,
                last_psi: Some(1.5),
                devices: vec![zram::policy::DevicePolicyStats {
                    name: "vm1".into(),
                    cold_age_secs: 150.0,
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    /// Checks the exposition format's rules a scraper enforces, and returns the samples.
    fn parse(text: &str) -> HashMap<String, f64> {
        let valid_name = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let (mut helped, mut typed, mut samples) = (HashSet::new(), HashMap::new(), HashMap::new());
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(helped.insert(name.to_string()), "two HELP for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                assert!(kind == "gauge" || kind == "counter", "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                typed.insert(name.to_string(), kind.to_string());
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert!(valid_name(name), "{line}");
                assert!(typed.contains_key(name), "sample before its TYPE: {line}");
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
                assert!(
                    samples.insert(series.to_string(), value).is_none(),
                    "{line}"
                );
            }
        }
        samples
    }

    #[test]
    fn every_series_is_well_formed_and_labelled_by_device() {
        let text = render(&reply());
        assert!(text.ends_with('\n'));
        let samples = parse(&text);
        assert_eq!(
            samples[r#"vzram_orig_data_size_bytes{device="vm1"}"#],
            4096.0
        );
        // A name with a quote, a backslash and a newline stays one line and one label.
        assert_eq!(
            samples[r#"vzram_orig_data_size_bytes{device="odd \"name\\\n"}"#],
            8192.0
        );
        assert_eq!(samples["vzram_store_mem_limit_bytes"], (64 << 20) as f64);
        assert_eq!(samples["vzram_store_pages_compacted_total"], 3.0);
        assert_eq!(
            samples[r#"vzram_policy_cold_age_seconds{device="vm1"}"#],
            150.0
        );
        assert_eq!(samples["vzram_policy_cpu_seconds_total"], 0.25);
        assert_eq!(samples["vzram_policy_psi_some_avg10"], 1.5);
        assert_eq!(samples["vzram_policy_idle_age_seconds"], 120.0);
        // Every per-device family has one sample per device.
        for &(name, ..) in DEVICE {
            assert!(!name.starts_with("vzram_store_"), "{name}");
            let n = samples
                .keys()
                .filter(|k| k.starts_with(&format!("{name}{{")))
                .count();
            assert_eq!(n, 2, "{name}");
        }
    }

    #[test]
    fn no_devices_still_gives_the_store() {
        let mut r = reply();
        r.devices.clear();
        r.policy.devices.clear();
        let samples = parse(&render(&r));
        assert_eq!(samples["vzram_store_mem_used_total_bytes"], 12288.0);
        assert!(!samples.keys().any(|k| k.contains("device=")));
    }
}
