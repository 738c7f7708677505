//! The control protocol: JSON lines over a Unix stream socket.
//!
//! A client writes one request object per line and reads one response object per line, in
//! order. A request names its command in `"cmd"`; an optional `"id"` (any JSON value) is echoed
//! in the response so that a client may pipeline. A response is `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":"..."}`. The types here are shared by the server and the client, so the
//! two cannot drift apart; statistics are zram's own types (`Serialize + Deserialize` there),
//! carried as they are.

use crate::counters::QueueStats;
use serde::{Deserialize, Serialize};

/// Which pages a maintenance command takes: zram's `type=` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PageType {
    /// Pages marked idle (see `vzram idle`).
    Idle,
    /// Pages stored uncompressed because compression did not pay.
    Huge,
    /// Huge pages that are also idle.
    #[value(name = "huge_idle", alias = "huge-idle")]
    HugeIdle,
    /// Pages a recompression pass could not shrink.
    Incompressible,
}

impl PageType {
    pub fn name(self) -> &'static str {
        match self {
            PageType::Idle => "idle",
            PageType::Huge => "huge",
            PageType::HugeIdle => "huge_idle",
            PageType::Incompressible => "incompressible",
        }
    }
}

impl From<PageType> for zram::PageFilter {
    fn from(t: PageType) -> zram::PageFilter {
        match t {
            PageType::Idle => zram::PageFilter::Idle,
            PageType::Huge => zram::PageFilter::Huge,
            PageType::HugeIdle => zram::PageFilter::HugeIdle,
            PageType::Incompressible => zram::PageFilter::Incompressible,
        }
    }
}

/// One request. `device` omitted means every device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Statistics of every device and of the store.
    Stat,
    /// Compact the pool now.
    Compact,
    /// Mark stored pages idle: all, or those not accessed for `age_secs` seconds.
    Idle {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        age_secs: Option<u64>,
    },
    /// Recompress pages of `type` with the secondary algorithm of `priority` (default 1).
    Recompress {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        #[serde(rename = "type")]
        page_type: PageType,
        /// Only pages whose compressed size is at least this many bytes (1..=4096).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        threshold: Option<u64>,
        /// Stop after trying this many pages (in total over the devices).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_pages: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        priority: Option<u8>,
    },
    /// Move pages of `type` to the device's backing file.
    Writeback {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        #[serde(rename = "type")]
        page_type: PageType,
        /// Write at most this many pages (in total over the devices).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit_pages: Option<u64>,
    },
    /// zram's `writeback_limit`: a budget of pages writeback may still write; `null` or
    /// omitted removes the budget.
    WritebackLimit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        #[serde(default)]
        pages: Option<u64>,
    },
    /// The store's memory limit in bytes; 0 removes it.
    MemLimit { bytes: u64 },
    /// Reset `mem_used_max` to the current use.
    ResetMemUsedMax,
}

/// Every value of `"cmd"`, for the error that names the known ones.
pub const COMMANDS: &[&str] = &[
    "stat",
    "compact",
    "idle",
    "recompress",
    "writeback",
    "writeback_limit",
    "mem_limit",
    "reset_mem_used_max",
];

/// A response line. `result` is present when `ok`, `error` when not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response<T> {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
}

/// A secondary (recompression) algorithm of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecompAlgorithm {
    pub priority: u8,
    /// `zstd`, or `zstd:9` with a level.
    pub algorithm: String,
}

/// One device in `stat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStat {
    pub name: String,
    /// The vhost-user socket.
    pub socket: String,
    pub connected: bool,
    /// vhost-user connections accepted so far.
    pub connections: u64,
    pub readonly: bool,
    /// Number of virtqueues, each served by its own worker and compression stream.
    pub streams: usize,
    pub recomp_algorithms: Vec<RecompAlgorithm>,
    /// zram's statistics (`disksize`, `comp_algorithm`, `mm_stat`, `io_stat`, `bd_stat`, ...)
    /// at the top level of the device object.
    #[serde(flatten)]
    pub zram: zram::Stats,
    /// Request counters, one entry per virtqueue.
    pub queues: Vec<QueueStats>,
}

/// The store the devices share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStat {
    /// Bytes; 0 = none.
    pub mem_limit: u64,
    pub mem_used_total: u64,
    pub mem_used_max: u64,
    /// Pages freed by compaction since start.
    pub pages_compacted: u64,
    /// Pages compaction could free now.
    pub freeable_pages: u64,
    /// The store's allocator.
    pub pool: zram::PoolStats,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatReply {
    pub devices: Vec<DeviceStat>,
    pub store: StoreStat,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactReply {
    /// Pages this compaction freed.
    pub pages_freed: u64,
    /// Pages freed by compaction since start (zram's `pages_compacted`).
    pub pages_compacted: u64,
}

/// A device a command for every device left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleDevice {
    pub name: String,
    /// Pages marked idle.
    pub marked: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleReply {
    pub devices: Vec<IdleDevice>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecompressDevice {
    pub name: String,
    /// Pages that matched and were tried.
    pub tried: u64,
    /// Pages kept in their new, smaller form.
    pub recompressed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecompressReply {
    pub devices: Vec<RecompressDevice>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackDevice {
    pub name: String,
    /// Pages written to the backing file.
    pub written: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackReply {
    pub devices: Vec<WritebackDevice>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackLimitReply {
    /// The devices whose limit was set.
    pub devices: Vec<String>,
    /// The budget in pages; `None`: no limit.
    pub pages: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemLimitReply {
    /// The store's limit now, in bytes; 0 = none.
    pub mem_limit: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetMemUsedMaxReply {
    pub mem_used_max: u64,
}

/// What the server answers, one variant per command. Untagged: the client knows which
/// command it sent and reads `result` as that command's reply type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Stat(StatReply),
    Compact(CompactReply),
    Idle(IdleReply),
    Recompress(RecompressReply),
    Writeback(WritebackReply),
    WritebackLimit(WritebackLimitReply),
    MemLimit(MemLimitReply),
    ResetMemUsedMax(ResetMemUsedMaxReply),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vzram stat --json` prints a [`StatReply`]: its field names and order are what clients
    /// parse, so they are pinned here, whatever types the statistics come from.
    #[test]
    fn the_stat_reply_wire_format_is_stable() {
        let reply = StatReply {
            devices: vec![DeviceStat {
                name: "vz0".into(),
                socket: "/run/vz0.sock".into(),
                connected: true,
                connections: 1,
                readonly: false,
                streams: 1,
                recomp_algorithms: vec![RecompAlgorithm {
                    priority: 1,
                    algorithm: "zstd".into(),
                }],
                zram: Default::default(),
                queues: vec![QueueStats::default()],
            }],
            store: StoreStat {
                mem_limit: 0,
                mem_used_total: 0,
                mem_used_max: 0,
                pages_compacted: 0,
                freeable_pages: 0,
                pool: Default::default(),
            },
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"devices":[{"name":"vz0","socket":"/run/vz0.sock","connected":true,"#,
                r#""connections":1,"readonly":false,"streams":1,"#,
                r#""recomp_algorithms":[{"priority":1,"algorithm":"zstd"}],"#,
                r#""disksize":0,"comp_algorithm":"","#,
                r#""mm_stat":{"orig_data_size":0,"compr_data_size":0,"mem_used_total":0,"#,
                r#""mem_limit":0,"mem_used_max":0,"same_pages":0,"pages_compacted":0,"#,
                r#""huge_pages":0,"huge_pages_since":0},"#,
                r#""io_stat":{"failed_reads":0,"failed_writes":0,"invalid_io":0,"notify_free":0},"#,
                r#""bd_stat":{"bd_count":0,"bd_reads":0,"bd_writes":0},"#,
                r#""reads":0,"writes":0,"read_bytes":0,"write_bytes":0,"#,
                r#""queues":[{"requests":0,"reads":0,"writes":0,"flushes":0,"discards":0,"#,
                r#""write_zeroes":0,"get_ids":0,"read_bytes":0,"write_bytes":0,"io_errors":0,"#,
                r#""unsupported":0}]}],"#,
                r#""store":{"mem_limit":0,"mem_used_total":0,"mem_used_max":0,"#,
                r#""pages_compacted":0,"freeable_pages":0,"#,
                r#""pool":{"pages_used":0,"pages_compacted":0,"page_limit":0,"capacity_pages":0,"#,
                r#""objects":0,"metadata_bytes":0}}}"#
            )
        );
        let back: StatReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reply);
    }
}
