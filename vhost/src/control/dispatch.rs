//! Answering a request line: find its command in [`COMMANDS`], read its arguments, run it.

use super::proto::{COMMANDS, Command, Devices, Response, Skipped};
use crate::device::BlkDevice;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use zram::Store;

/// Why a request failed; its text is the response's `error`.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("malformed JSON: {0}")]
    Json(serde_json::Error),
    #[error("bad request: duplicate key {0:?}; each key may appear once")]
    DuplicateKey(String),
    #[error("a request must be a JSON object with a \"cmd\", like {{\"cmd\":\"stat\"}}")]
    NotAnObject,
    #[error("\"cmd\" must be a string")]
    CmdNotString,
    #[error("unknown command {0:?} (commands: {names})",
            names = COMMANDS.iter().map(|e| e.name).collect::<Vec<_>>().join(", "))]
    UnknownCommand(String),
    #[error("bad request for {cmd:?}: {source}")]
    BadArguments {
        cmd: &'static str,
        source: serde_json::Error,
    },
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

/// A request's arguments: its keys but `cmd` and `id`.
type Args = Map<String, Value>;

/// A command as the server finds it: its name, and what answers a request for it.
pub struct Entry {
    name: &'static str,
    answer: fn(&Context, Option<Value>, Args) -> Vec<u8>,
}

impl Entry {
    pub(super) const fn of<C: Command>() -> Entry {
        Entry {
            name: C::NAME,
            answer: answer::<C>,
        }
    }
}

/// Reads `args` as `C`, runs it and answers with its reply.
fn answer<C: Command>(ctx: &Context, id: Option<Value>, args: Args) -> Vec<u8> {
    let cmd = serde_json::from_value::<C>(Value::Object(args)).map_err(|source| {
        CommandError::BadArguments {
            cmd: C::NAME,
            source,
        }
    });
    respond(
        id,
        cmd.and_then(|cmd| {
            log::debug!("control request: {cmd:?}");
            cmd.run(ctx)
        }),
    )
}

/// One response line, newline included.
fn respond<T: Serialize>(id: Option<Value>, result: Result<T, CommandError>) -> Vec<u8> {
    let (result, error) = match result {
        Ok(result) => (Some(result), None),
        Err(e) => {
            log::info!("control request failed: {e}");
            (None, Some(e.to_string()))
        }
    };
    let ok = error.is_none();
    let response = Response {
        ok,
        id,
        error,
        result,
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| {
        // Our own reply types always serialise; this is a bug, but the client still
        // deserves an answer.
        format!(r#"{{"ok":false,"error":"internal error: {e}"}}"#).into_bytes()
    });
    out.push(b'\n');
    out
}

/// A request object as read, with the first key it repeats: serde_json would keep the last
/// value of a repeated key, and `{"cmd":"stat","cmd":"compact"}` must not quietly compact.
struct Object {
    map: Args,
    repeated: Option<String>,
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Object, A::Error> {
                let (mut map, mut repeated) = (Args::new(), None);
                while let Some((key, value)) = entries.next_entry::<String, Value>()? {
                    if map.contains_key(&key) {
                        repeated.get_or_insert_with(|| key.clone());
                    }
                    map.insert(key, value);
                }
                Ok(Object { map, repeated })
            }
        }
        d.deserialize_map(Entries)
    }
}

/// Parses one request line: the `id` to echo (if the line was an object), and the command
/// with its arguments.
fn parse(line: &[u8]) -> (Option<Value>, Result<(&'static Entry, Args), CommandError>) {
    let Object { mut map, repeated } = match serde_json::from_slice(line) {
        Ok(object) => object,
        // Valid JSON, but not an object.
        Err(e) if e.is_data() => return (None, Err(CommandError::NotAnObject)),
        Err(e) => return (None, Err(CommandError::Json(e))),
    };
    let id = map.remove("id");
    if let Some(key) = repeated {
        return (id, Err(CommandError::DuplicateKey(key)));
    }
    let entry = match map.remove("cmd") {
        None => Err(CommandError::NotAnObject),
        Some(Value::String(c)) => {
            (COMMANDS.iter().find(|e| e.name == c)).ok_or(CommandError::UnknownCommand(c))
        }
        Some(_) => Err(CommandError::CmdNotString),
    };
    (id, entry.map(|e| (e, map)))
}

/// What the commands work on.
#[derive(Debug)]
pub struct Context {
    pub(super) devices: Vec<Arc<BlkDevice>>,
    pub(super) store: Arc<Store>,
    /// Set on shutdown: a running recompression or writeback stops at the next page.
    pub(super) cancel: AtomicBool,
    /// Held by the maintenance passes, which run one at a time.
    pub(super) maintenance: Mutex<()>,
    /// The policy thread.
    pub(super) policy: super::policy::PolicyThread,
}

/// What a maintenance pass did with one device.
pub(super) enum Outcome<T> {
    /// The device's reply entry, and the pages of the budget it used.
    Done(T, u64),
    /// Left out, and why.
    Skipped(String),
}

/// A maintenance pass for [`Context::each_device`].
pub(super) struct Pass<'a> {
    /// The device named, or `None`: every device.
    pub device: Option<&'a str>,
    /// Pages the pass may use over all devices.
    pub budget: Option<u64>,
    /// What was done before a shutdown stopped the pass, given the pages used.
    pub stopped: fn(u64) -> String,
    /// Why no device was eligible.
    pub none_eligible: String,
}

impl Context {
    pub(super) fn new(
        devices: Vec<Arc<BlkDevice>>,
        store: Arc<Store>,
        policy: super::policy::PolicyThread,
    ) -> Context {
        Context {
            devices,
            store,
            cancel: AtomicBool::new(false),
            maintenance: Mutex::new(()),
            policy,
        }
    }

    /// Answers one request line with one response line (newline included). Never fails: every
    /// error becomes an `{"ok":false}` response.
    pub(super) fn handle_line(&self, line: &[u8]) -> Vec<u8> {
        match parse(line) {
            (id, Ok((entry, args))) => (entry.answer)(self, id, args),
            (id, Err(e)) => respond::<()>(id, Err(e)),
        }
    }

    /// The named device, or every device.
    pub(super) fn targets(&self, name: Option<&str>) -> Result<Vec<&BlkDevice>, CommandError> {
        let Some(name) = name else {
            return Ok(self.devices.iter().map(|s| &**s).collect());
        };
        match self.devices.iter().find(|s| s.name == name) {
            Some(s) => Ok(vec![s]),
            None => Err(CommandError::UnknownDevice {
                name: name.to_string(),
                known: (self.devices.iter().map(|s| s.name.as_str()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// A maintenance pass over the named device or every device, one pass at a time. `run`
    /// gets each device and what is left of the budget. Once the budget is spent, the devices
    /// are still passed (with 0 left) and listed: every command says what it did. A shutdown
    /// ends the pass after the current device.
    pub(super) fn each_device<T>(
        &self,
        pass: Pass,
        mut run: impl FnMut(&BlkDevice, Option<u64>) -> Result<Outcome<T>, zram::Error>,
    ) -> Result<Devices<T>, CommandError> {
        let targets = self.targets(pass.device)?;
        let _one_at_a_time = self.maintenance.lock();
        let mut reply = Devices {
            devices: Vec::new(),
            skipped: Vec::new(),
        };
        let mut used = 0u64;
        for s in targets {
            let left = pass.budget.map(|b| b.saturating_sub(used));
            let outcome = run(s, left).map_err(|source| CommandError::Device {
                device: s.name.clone(),
                source,
            })?;
            match outcome {
                Outcome::Done(entry, pages) => {
                    used += pages;
                    reply.devices.push(entry);
                }
                Outcome::Skipped(reason) => {
                    let name = s.name.clone();
                    reply.skipped.push(Skipped { name, reason });
                    continue;
                }
            }
            if self.cancel.load(Relaxed) {
                let done = (pass.stopped)(used);
                return Err(CommandError::Stopped { done });
            }
        }
        if reply.devices.is_empty() && !reply.skipped.is_empty() {
            return Err(CommandError::NoEligibleDevice(pass.none_eligible));
        }
        Ok(reply)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon's answer to one line, from a daemon without devices.
    fn answer(line: impl AsRef<[u8]>) -> Value {
        let store = Store::new(zram::StoreConfig {
            capacity_pages: 64,
            ..Default::default()
        });
        let store = Arc::new(store.unwrap());
        let policy = super::super::policy::PolicyThread::start(
            Default::default(),
            store.clone(),
            Vec::new(),
        )
        .unwrap();
        let ctx = Context::new(Vec::new(), store, policy);
        let out = ctx.handle_line(line.as_ref());
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    fn error(line: impl AsRef<[u8]>) -> String {
        let a = answer(line);
        assert_eq!(a["ok"], false, "{a}");
        a["error"].as_str().unwrap().to_string()
    }

    #[test]
    fn every_listed_command_is_answered() {
        let minimal = [
            r#"{"cmd":"stat"}"#,
            r#"{"cmd":"compact"}"#,
            r#"{"cmd":"idle"}"#,
            r#"{"cmd":"recompress","type":"huge"}"#,
            r#"{"cmd":"writeback","type":"idle"}"#,
            r#"{"cmd":"writeback_limit"}"#,
            r#"{"cmd":"mem_limit","bytes":0}"#,
            r#"{"cmd":"reset_mem_used_max"}"#,
            r#"{"cmd":"policy"}"#,
        ];
        assert_eq!(minimal.len(), COMMANDS.len());
        for line in minimal {
            let a = answer(line);
            assert_eq!(a["ok"], true, "{line}: {a}");
            assert!(a["result"].is_object(), "{line}: {a}");
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        for (line, want) in [
            (&b"{"[..], "malformed JSON"),
            (b"", "malformed JSON"),
            // Invalid UTF-8, inside a string or outside one; a control character.
            (b"{\"cmd\":\"st\xffat\"}", "malformed JSON"),
            (b"\xff\xfe", "malformed JSON"),
            (b"{\"cmd\":\"stat\"}\xc3", "malformed JSON"),
            (b"{\"cmd\":\"st\x00at\"}", "malformed JSON"),
            // Nothing after the object, and exactly one object.
            (br#"{"cmd":"stat"} {"cmd":"compact"}"#, "malformed JSON"),
            (b"[1]", "must be a JSON object"),
            (br#""stat""#, "must be a JSON object"),
            (br#"{"id":1}"#, "must be a JSON object with a \"cmd\""),
            (br#"{"cmd":7}"#, "\"cmd\" must be a string"),
            (br#"{"cmd":["stat"]}"#, "\"cmd\" must be a string"),
            (br#"{"cmd":null}"#, "\"cmd\" must be a string"),
            (br#"{"cmd":"idle","devce":"vz0"}"#, "unknown field `devce`"),
            (br#"{"cmd":"mem_limit"}"#, "missing field `bytes`"),
            (
                br#"{"cmd":"mem_limit","bytes":-1}"#,
                "bad request for \"mem_limit\"",
            ),
            (
                br#"{"cmd":"writeback","type":"cold"}"#,
                "unknown variant `cold`",
            ),
            (br#"{"cmd":"recompress"}"#, "missing field `type`"),
            // Wrong types.
            (
                br#"{"cmd":"mem_limit","bytes":"1G"}"#,
                "invalid type: string",
            ),
            (br#"{"cmd":"idle","device":7}"#, "invalid type: integer"),
            (
                br#"{"cmd":"idle","age_secs":1.5}"#,
                "invalid type: floating point",
            ),
            // Values the types allow but the command does not.
            (
                br#"{"cmd":"recompress","type":"idle","priority":0}"#,
                "priority 0",
            ),
            (
                br#"{"cmd":"idle","device":"vz0"}"#,
                "unknown device \"vz0\"",
            ),
        ] {
            let e = error(line);
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(line));
        }
        assert_eq!(
            error(r#"{"cmd":"frob"}"#),
            "unknown command \"frob\" (commands: stat, compact, idle, recompress, writeback, \
             writeback_limit, mem_limit, reset_mem_used_max, policy)"
        );
        assert_eq!(
            error(r#"{"cmd":"stat","x":1}"#),
            "bad request for \"stat\": unknown field `x`, there are no fields"
        );
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
            let e = error(line);
            assert!(e.contains("duplicate key"), "{line}: {e}");
        }
        assert_eq!(
            error(r#"{"cmd":"stat","cmd":"compact"}"#),
            r#"bad request: duplicate key "cmd"; each key may appear once"#
        );
        // The same key in different objects is fine.
        assert_eq!(answer(r#"{"cmd":"stat","id":{"cmd":1}}"#)["ok"], true);
    }

    #[test]
    fn id_is_kept_even_for_bad_requests() {
        assert_eq!(answer(r#"{"cmd":"frob","id":"x"}"#)["id"], "x");
        assert_eq!(answer(r#"{"cmd":"stat","id":1,"x":2}"#)["id"], 1);
        assert_eq!(answer(r#"{"id":1,"cmd":"stat","id":2}"#)["id"], 2);
        let a = answer(r#"{"id":[1,2],"cmd":"stat"}"#);
        assert_eq!(
            (&a["id"], &a["ok"]),
            (&serde_json::json!([1, 2]), &Value::Bool(true))
        );
        assert!(answer(r#"{"cmd":"stat"}"#).get("id").is_none());
    }
}
