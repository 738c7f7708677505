//! Executing control requests against the served devices and the store.

use super::proto::*;
use crate::served::Served;
use parking_lot::Mutex;
use serde::de::{Deserialize, Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use zcomp::Priority;
use zram::Store;

/// Why a request failed; its text is the response's `error`.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("malformed JSON: {0}")]
    Json(serde_json::Error),
    #[error("bad request: {0}")]
    DuplicateKey(serde_json::Error),
    #[error("a request must be a JSON object with a \"cmd\", like {{\"cmd\":\"stat\"}}")]
    NotAnObject,
    #[error("\"cmd\" must be a string")]
    CmdNotString,
    #[error("unknown command {0:?} (commands: {commands})", commands = COMMANDS.join(", "))]
    UnknownCommand(String),
    #[error("bad request for {cmd:?}: {source}")]
    BadArguments {
        cmd: String,
        source: serde_json::Error,
    },
    #[error("bad request for {cmd:?}: unknown field `{field}`; it takes no arguments")]
    NoArguments { cmd: String, field: String },
    #[error("unknown device {name:?} (devices: {known})")]
    UnknownDevice { name: String, known: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no device can do this: {0}")]
    NoEligibleDevice(String),
    #[error("{device}: {source}")]
    Device { device: String, source: zram::Error },
    #[error("stopped: the daemon is shutting down ({done})")]
    Stopped { done: String },
}

/// What the control threads need to answer requests.
#[derive(Debug)]
pub(crate) struct Context {
    pub devices: Vec<Arc<Served>>,
    pub store: Arc<Store>,
    /// Set on shutdown: a running recompression or writeback stops at the next page.
    pub cancel: AtomicBool,
    /// Held by the maintenance passes, which run one at a time.
    maintenance: Mutex<()>,
}

/// A JSON object's keys, each seen once: serde_json keeps the last of duplicated keys, and
/// `{"cmd":"stat","cmd":"compact"}` must not quietly compact.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<UniqueKeys, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(A::Error::custom(format_args!(
                            "duplicate key {key:?}; each key may appear once"
                        )));
                    }
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(Keys)
    }
}

/// Parses one request line: the request and the `id` to echo (if the line was an object).
fn parse(line: &[u8]) -> (Option<Value>, Result<Request, CommandError>) {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return (None, Err(CommandError::Json(e))),
    };
    let Value::Object(mut map) = value else {
        return (None, Err(CommandError::NotAnObject));
    };
    let id = map.remove("id");
    if let Err(e) = serde_json::from_slice::<UniqueKeys>(line) {
        return (id, Err(CommandError::DuplicateKey(e)));
    }
    // Checked here rather than left to serde, whose message for an unknown variant of an
    // internally tagged enum does not say "command".
    let cmd = match map.get("cmd") {
        None => return (id, Err(CommandError::NotAnObject)),
        Some(Value::String(c)) if COMMANDS.contains(&c.as_str()) => c.clone(),
        Some(Value::String(c)) => return (id, Err(CommandError::UnknownCommand(c.clone()))),
        Some(_) => return (id, Err(CommandError::CmdNotString)),
    };
    // serde's deny_unknown_fields does not reach the unit variants of an internally tagged
    // enum; without this, a misspelt argument would be ignored silently.
    if matches!(cmd.as_str(), "stat" | "compact" | "reset_mem_used_max")
        && let Some(field) = map.keys().find(|k| *k != "cmd")
    {
        let field = field.clone();
        return (id, Err(CommandError::NoArguments { cmd, field }));
    }
    let req = serde_json::from_value(Value::Object(map))
        .map_err(|source| CommandError::BadArguments { cmd, source });
    (id, req)
}

impl Context {
    pub fn new(devices: Vec<Arc<Served>>, store: Arc<Store>) -> Context {
        Context {
            devices,
            store,
            cancel: AtomicBool::new(false),
            maintenance: Mutex::new(()),
        }
    }

    /// Answers one request line with one response line (newline included). Never fails: every
    /// error becomes an `{"ok":false}` response.
    pub fn handle_line(&self, line: &[u8]) -> Vec<u8> {
        let (id, req) = parse(line);
        let response = match req.and_then(|r| {
            log::debug!("control request: {r:?}");
            self.execute(r)
        }) {
            Ok(reply) => Response {
                ok: true,
                id,
                error: None,
                result: Some(reply),
            },
            Err(e) => {
                log::info!("control request failed: {e}");
                Response {
                    ok: false,
                    id,
                    error: Some(e.to_string()),
                    result: None,
                }
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| {
            // Our own reply types always serialise; this is a bug, but the client still
            // deserves an answer.
            format!(r#"{{"ok":false,"error":"internal error: {e}"}}"#).into_bytes()
        });
        out.push(b'\n');
        out
    }

    pub fn execute(&self, req: Request) -> Result<Reply, CommandError> {
        Ok(match req {
            Request::Stat => Reply::Stat(self.stat()),
            Request::Compact => {
                let _one_at_a_time = self.maintenance.lock();
                let freed = self.store.compact() as u64;
                Reply::Compact(CompactReply {
                    pages_freed: freed,
                    pages_compacted: self.store.pages_compacted(),
                })
            }
            Request::Idle { device, age_secs } => {
                let age = age_secs.map(Duration::from_secs);
                let _one_at_a_time = self.maintenance.lock();
                let devices = self
                    .targets(device.as_deref())?
                    .into_iter()
                    .map(|s| IdleDevice {
                        name: s.name.clone(),
                        marked: s.device.mark_idle(age),
                    })
                    .collect();
                Reply::Idle(IdleReply { devices })
            }
            Request::Recompress {
                device,
                page_type,
                threshold,
                max_pages,
                priority,
            } => Reply::Recompress(self.recompress(
                device.as_deref(),
                page_type,
                threshold,
                max_pages,
                priority,
            )?),
            Request::Writeback {
                device,
                page_type,
                limit_pages,
            } => Reply::Writeback(self.writeback(device.as_deref(), page_type, limit_pages)?),
            Request::WritebackLimit { device, pages } => {
                let targets = self.targets(device.as_deref())?;
                for s in &targets {
                    s.device.set_writeback_limit(pages);
                }
                Reply::WritebackLimit(WritebackLimitReply {
                    devices: targets.iter().map(|s| s.name.clone()).collect(),
                    pages,
                })
            }
            Request::MemLimit { bytes } => {
                self.store.set_mem_limit(bytes);
                Reply::MemLimit(MemLimitReply {
                    mem_limit: self.store.mem_limit(),
                })
            }
            Request::ResetMemUsedMax => {
                self.store.reset_mem_used_max();
                Reply::ResetMemUsedMax(ResetMemUsedMaxReply {
                    mem_used_max: self.store.mem_used_max(),
                })
            }
        })
    }

    /// The named device, or every device.
    fn targets(&self, name: Option<&str>) -> Result<Vec<&Arc<Served>>, CommandError> {
        match name {
            None => Ok(self.devices.iter().collect()),
            Some(name) => self
                .devices
                .iter()
                .find(|s| s.name == name)
                .map(|s| vec![s])
                .ok_or_else(|| CommandError::UnknownDevice {
                    name: name.to_string(),
                    known: self
                        .devices
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
        }
    }

    pub fn stat(&self) -> StatReply {
        let devices = self.devices.iter().map(|s| device_stat(s)).collect();
        StatReply {
            devices,
            store: StoreStat {
                mem_limit: self.store.mem_limit(),
                mem_used_total: self.store.mem_used_total(),
                mem_used_max: self.store.mem_used_max(),
                pages_compacted: self.store.pages_compacted(),
                freeable_pages: self.store.freeable_pages() as u64,
                pool: self.store.pool_stats(),
            },
        }
    }

    fn recompress(
        &self,
        device: Option<&str>,
        page_type: PageType,
        threshold: Option<u64>,
        max_pages: Option<u64>,
        priority: Option<u8>,
    ) -> Result<RecompressReply, CommandError> {
        let prio = priority.unwrap_or(1);
        let prio = Priority::new(prio)
            .filter(|p| !p.is_primary())
            .ok_or_else(|| {
                CommandError::InvalidArgument(format!(
                    "priority {prio}: recompression uses a secondary algorithm, 1..={}",
                    Priority::MAX
                ))
            })?;
        let threshold = threshold
            .map(|t| match usize::try_from(t) {
                Ok(t @ 1..=zram::PAGE_SIZE) => Ok(t),
                _ => Err(CommandError::InvalidArgument(format!(
                    "threshold {t}: a compressed size in bytes, 1..={}",
                    zram::PAGE_SIZE
                ))),
            })
            .transpose()?;
        let mut reply = RecompressReply {
            devices: Vec::new(),
            skipped: Vec::new(),
        };
        let targets = self.targets(device)?;
        let _one_at_a_time = self.maintenance.lock();
        let mut tried = 0u64;
        for s in targets {
            // Every device when none was named: those without this algorithm are left out;
            // a named one without it is an error (below, from zram).
            if device.is_none() && s.device.comp().backend(prio).is_none() {
                reply.skipped.push(Skipped {
                    name: s.name.clone(),
                    reason: format!("no recompression algorithm with priority {prio}"),
                });
                continue;
            }
            // Once `max_pages` is spent, the pass tries nothing, but the device is still
            // listed (with 0): every command says what it did.
            let left = max_pages.map(|m| m.saturating_sub(tried));
            let mut stream = s.device.new_stream();
            let r = s
                .device
                .recompress(
                    page_type.into(),
                    threshold,
                    left,
                    prio,
                    &mut stream,
                    &self.cancel,
                )
                .map_err(|source| CommandError::Device {
                    device: s.name.clone(),
                    source,
                })?;
            tried += r.tried;
            reply.devices.push(RecompressDevice {
                name: s.name.clone(),
                tried: r.tried,
                recompressed: r.recompressed,
            });
            if self.cancel.load(Relaxed) {
                return Err(CommandError::Stopped {
                    done: format!("recompression stopped after {tried} pages tried"),
                });
            }
        }
        if reply.devices.is_empty() && !reply.skipped.is_empty() {
            return Err(CommandError::NoEligibleDevice(format!(
                "no device has a recompression algorithm with priority {prio} \
                 (start the daemon with --recomp)"
            )));
        }
        Ok(reply)
    }

    fn writeback(
        &self,
        device: Option<&str>,
        page_type: PageType,
        limit: Option<u64>,
    ) -> Result<WritebackReply, CommandError> {
        let mut reply = WritebackReply {
            devices: Vec::new(),
            skipped: Vec::new(),
        };
        let targets = self.targets(device)?;
        let _one_at_a_time = self.maintenance.lock();
        let mut written = 0u64;
        for s in targets {
            // As for recompression: a spent limit still lists the device, with 0.
            let left = limit.map(|l| l.saturating_sub(written));
            match s.device.writeback(page_type.into(), left, &self.cancel) {
                Ok(n) => {
                    written += n;
                    reply.devices.push(WritebackDevice {
                        name: s.name.clone(),
                        written: n,
                    });
                    if self.cancel.load(Relaxed) {
                        return Err(CommandError::Stopped {
                            done: format!("writeback stopped after {written} pages written"),
                        });
                    }
                }
                // Every device when none was named: those without a backing file are left
                // out, not an error.
                Err(zram::Error::NoBackingFile) if device.is_none() => {
                    reply.skipped.push(Skipped {
                        name: s.name.clone(),
                        reason: "no backing file".into(),
                    });
                }
                Err(source) => {
                    return Err(CommandError::Device {
                        device: s.name.clone(),
                        source,
                    });
                }
            }
        }
        if reply.devices.is_empty() && !reply.skipped.is_empty() {
            return Err(CommandError::NoEligibleDevice(
                "no device has a backing file (start the daemon with --backing-file)".into(),
            ));
        }
        Ok(reply)
    }
}

fn device_stat(s: &Served) -> DeviceStat {
    let comp = s.device.comp();
    let recomp_algorithms = comp
        .priorities()
        .filter(|p| !p.is_primary())
        .map(|p| RecompAlgorithm {
            priority: p.get(),
            algorithm: match comp.params(p) {
                Some(params) => match params.level {
                    Some(level) => format!("{}:{level}", params.algorithm),
                    None => params.algorithm.to_string(),
                },
                None => comp
                    .backend(p)
                    .map(|b| b.name().to_string())
                    .unwrap_or_default(),
            },
        })
        .collect();
    DeviceStat {
        name: s.name.clone(),
        socket: s.socket.display().to_string(),
        connected: s.connected.load(Relaxed),
        connections: s.connections.load(Relaxed),
        readonly: s.readonly,
        streams: s.queues.len(),
        recomp_algorithms,
        zram: s.device.stats(),
        queues: s.queues.iter().map(|q| q.snapshot()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> (Option<Value>, Result<Request, CommandError>) {
        parse(s.as_bytes())
    }

    #[test]
    fn every_listed_command_parses() {
        let minimal = [
            r#"{"cmd":"stat"}"#,
            r#"{"cmd":"compact"}"#,
            r#"{"cmd":"idle"}"#,
            r#"{"cmd":"recompress","type":"huge"}"#,
            r#"{"cmd":"writeback","type":"idle"}"#,
            r#"{"cmd":"writeback_limit"}"#,
            r#"{"cmd":"mem_limit","bytes":0}"#,
            r#"{"cmd":"reset_mem_used_max"}"#,
        ];
        assert_eq!(minimal.len(), COMMANDS.len());
        for (line, name) in minimal.iter().zip(COMMANDS) {
            assert!(line.contains(&format!("\"{name}\"")), "{line} is {name}");
            let req = parse_str(line).1.unwrap_or_else(|e| panic!("{line}: {e}"));
            // And back: what a client sends is what the server reads.
            let again = serde_json::to_string(&req).unwrap();
            assert_eq!(parse_str(&again).1.unwrap(), req);
        }
    }

    #[test]
    fn full_requests_round_trip() {
        let reqs = [
            Request::Idle {
                device: Some("vz0".into()),
                age_secs: Some(60),
            },
            Request::Recompress {
                device: None,
                page_type: PageType::HugeIdle,
                threshold: Some(1000),
                max_pages: Some(5),
                priority: Some(2),
            },
            Request::Writeback {
                device: Some("a".into()),
                page_type: PageType::Incompressible,
                limit_pages: Some(7),
            },
            Request::WritebackLimit {
                device: None,
                pages: Some(9),
            },
            Request::MemLimit { bytes: 1 << 30 },
        ];
        for req in reqs {
            let line = serde_json::to_string(&req).unwrap();
            assert_eq!(parse_str(&line).1.unwrap(), req, "{line}");
        }
        assert_eq!(
            parse_str(r#"{"cmd":"writeback_limit","pages":null}"#)
                .1
                .unwrap(),
            Request::WritebackLimit {
                device: None,
                pages: None
            }
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |s: &str| match parse_str(s).1 {
            Err(e) => e.to_string(),
            Ok(r) => panic!("{s} parsed as {r:?}"),
        };
        assert!(err("{").starts_with("malformed JSON"));
        assert!(err("").starts_with("malformed JSON"));
        assert!(err("[1]").contains("must be a JSON object"));
        assert!(err(r#"{"id":1}"#).contains("must be a JSON object with a \"cmd\""));
        assert!(err(r#"{"cmd":7}"#).contains("must be a string"));
        let e = err(r#"{"cmd":"frob"}"#);
        assert!(
            e.contains("unknown command \"frob\"") && e.contains("stat, compact"),
            "{e}"
        );
        assert!(err(r#"{"cmd":"stat","x":1}"#).contains("unknown field `x`"));
        assert!(err(r#"{"cmd":"idle","devce":"vz0"}"#).contains("unknown field `devce`"));
        assert!(err(r#"{"cmd":"mem_limit"}"#).contains("missing field `bytes`"));
        assert!(err(r#"{"cmd":"mem_limit","bytes":-1}"#).contains("mem_limit"));
        assert!(err(r#"{"cmd":"writeback","type":"cold"}"#).contains("unknown variant"));
        assert!(err(r#"{"cmd":"recompress"}"#).contains("missing field `type`"));
        // Wrong types.
        assert!(err(r#"{"cmd":"mem_limit","bytes":"1G"}"#).contains("invalid type: string"));
        assert!(err(r#"{"cmd":"idle","device":7}"#).contains("invalid type: integer"));
        assert!(err(r#"{"cmd":"idle","age_secs":1.5}"#).contains("invalid type"));
        assert!(err(r#"{"cmd":["stat"]}"#).contains("must be a string"));
        assert!(err(r#"{"cmd":null}"#).contains("must be a string"));
        // Invalid UTF-8, inside a string or outside one.
        assert!(err("{\"cmd\":\"st\u{0}at\"}").starts_with("malformed JSON"));
        for bytes in [
            &b"{\"cmd\":\"st\xffat\"}"[..],
            b"\xff\xfe",
            b"{\"cmd\":\"stat\"}\xc3",
        ] {
            let e = parse(bytes).1.unwrap_err().to_string();
            assert!(e.starts_with("malformed JSON"), "{e}");
        }
        // Nothing after the object, and exactly one object.
        assert!(err(r#"{"cmd":"stat"} {"cmd":"compact"}"#).starts_with("malformed JSON"));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        for line in [
            r#"{"cmd":"stat","cmd":"compact"}"#,
            r#"{"cmd":"compact","cmd":"stat"}"#,
            r#"{"cmd":"mem_limit","bytes":1,"bytes":0}"#,
            r#"{"id":1,"cmd":"stat","id":2}"#,
            r#"{"cmd":"idle","device":"a","age_secs":1,"device":"a"}"#,
        ] {
            let e = parse_str(line).1.unwrap_err().to_string();
            assert!(e.contains("duplicate key"), "{line}: {e}");
        }
        let e = parse_str(r#"{"cmd":"stat","cmd":"compact"}"#)
            .1
            .unwrap_err();
        assert!(e.to_string().contains(r#"duplicate key "cmd""#), "{e}");
        // The same key in different objects is fine.
        assert_eq!(
            parse_str(r#"{"cmd":"stat","id":{"cmd":1}}"#).1.unwrap(),
            Request::Stat
        );
    }

    #[test]
    fn id_is_kept_even_for_bad_requests() {
        assert_eq!(parse_str(r#"{"cmd":"frob","id":"x"}"#).0, Some("x".into()));
        let (id, req) = parse_str(r#"{"id":[1,2],"cmd":"stat"}"#);
        assert_eq!(id, Some(serde_json::json!([1, 2])));
        assert_eq!(req.unwrap(), Request::Stat);
    }
}
