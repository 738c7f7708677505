//! The `vzram` command-line client: the subcommands that talk to a running daemon over its
//! control socket (see [`crate::control::proto`] for the protocol).

use crate::control::proto::*;
use crate::table::{self, human_size};
use serde::de::DeserializeOwned;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the client looks for the daemon when neither `--control` nor [`CONTROL_ENV`] is set.
pub const DEFAULT_CONTROL: &str = "/run/vzram/vzram.ctl";
/// The environment variable naming the control socket.
pub const CONTROL_ENV: &str = "VZRAM_CONTROL";
/// How long the client waits for an answer by default: recompression or writeback of a large
/// device runs to the end before the daemon answers.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the control socket {}: {source}{hint}",
        path.display(),
        hint = connect_hint(source)
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no answer from the daemon within {0} s (it may still be working; raise --timeout)")]
    Timeout(u64),
    #[error("the daemon closed the connection without answering")]
    Closed,
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon refused the request; the text is its `error`.
    #[error("{0}")]
    Server(String),
    #[error("writing the output: {0}")]
    Output(io::Error),
}

fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            " (is the vzram daemon running? Name its socket with --control or VZRAM_CONTROL)"
        }
        io::ErrorKind::PermissionDenied => " (the socket is mode 0600: run as the daemon's user)",
        _ => "",
    }
}

/// Options every client subcommand takes.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct Connection {
    /// The daemon's control socket [default: $VZRAM_CONTROL if set, else /run/vzram/vzram.ctl]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Seconds to wait for the daemon's answer; 0 waits for ever [default: 600]
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

impl Connection {
    /// `--control`, else `$VZRAM_CONTROL`, else [`DEFAULT_CONTROL`].
    pub fn path(&self) -> PathBuf {
        self.control
            .clone()
            .or_else(|| std::env::var_os(CONTROL_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL))
    }

    pub fn timeout_secs(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS)
    }
}

/// The argument of `vzram idle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleAge {
    /// Every stored page.
    All,
    /// Pages not accessed for at least this long.
    Older(Duration),
}

/// The argument of `vzram writeback-limit`: a budget in pages, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WritebackBudget(pub Option<u64>);

/// Parses `all` or an age: a number with an optional s, m, h or d suffix (seconds without).
pub fn parse_age(s: &str) -> Result<IdleAge, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(IdleAge::All);
    }
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_lowercase()),
        _ => (t, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => {
            return Err(format!(
                "{s:?}: expected `all` or an age like 30s, 5m, 1h or 2d"
            ));
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(|secs| IdleAge::Older(Duration::from_secs(secs)))
        .ok_or_else(|| format!("{s:?}: expected `all` or an age like 30s, 5m, 1h or 2d"))
}

/// A size with an optional K, M, G or T suffix, as zram takes it.
fn parse_size(s: &str) -> Result<u64, String> {
    zram::parse_size(s).map_err(|e| e.to_string())
}

fn parse_budget(s: &str) -> Result<WritebackBudget, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(WritebackBudget(None));
    }
    s.parse()
        .map(|n| WritebackBudget(Some(n)))
        .map_err(|_| format!("{s:?}: expected a number of pages or `none`"))
}

/// The subcommands that control a running daemon.
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum ClientCommand {
    /// Show the devices, their memory use and I/O counters
    ///
    /// A zramctl-like table (DISKSIZE: the device's size; DATA: uncompressed bytes stored;
    /// COMPR: their compressed size; TOTAL: memory the pool holds, allocator overhead
    /// included; STREAMS: queues, each with its own worker and compression stream), then for
    /// each device zram's mm_stat, io_stat and bd_stat fields under zram's names, the
    /// requests each queue served, and the store's memory limit and high-water mark.
    Stat {
        /// Print the daemon's answer as JSON instead
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },

    /// Compact the pool now
    ///
    /// Moves compressed pages out of partly used allocator pages so that those pages can be
    /// freed, like writing to zram's `compact`. The daemon also compacts by itself when
    /// enough pages can be freed.
    Compact {
        #[command(flatten)]
        conn: Connection,
    },

    /// Mark stored pages idle
    ///
    /// Like zram's `idle` file: marks every stored page (`all`), or those the guest has not
    /// read or written for at least AGE. `recompress --type idle` and `writeback --type idle`
    /// then act on them. A page loses its mark when it is accessed.
    Idle {
        /// `all`, or an age: 30s, 5m, 1h, 2d (a bare number is seconds)
        #[arg(value_parser = parse_age)]
        age: IdleAge,
        /// Only this device [default: every device]
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },

    /// Recompress pages with a secondary algorithm
    ///
    /// Like zram's `recompress`: each matching page is compressed again with the
    /// recompression algorithm of the given priority (the daemon's --recomp, e.g. zstd) and
    /// kept only if that makes it smaller; pages that do not shrink are marked
    /// incompressible. Guest I/O goes on meanwhile. The daemon answers when the pass is done.
    ///
    /// Typical use: `vzram idle 1h && vzram recompress --type idle`.
    Recompress {
        /// Only this device [default: every device with such an algorithm]
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        /// Which pages
        #[arg(long = "type", value_name = "TYPE", value_enum, default_value_t = PageType::Idle)]
        page_type: PageType,
        /// Only pages whose compressed size is at least this many bytes (K suffix allowed)
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        threshold: Option<u64>,
        /// Try at most this many pages
        #[arg(long, value_name = "N")]
        max_pages: Option<u64>,
        /// Which recompression algorithm, by priority (1..=3)
        #[arg(long, value_name = "P", default_value_t = 1,
              value_parser = clap::value_parser!(u8).range(1..=3))]
        priority: u8,
        #[command(flatten)]
        conn: Connection,
    },

    /// Move pages to the backing file
    ///
    /// Like zram's `writeback`: matching pages are written, compressed as they are, to the
    /// device's backing file (the daemon's --backing-file) and their memory is freed. Reading
    /// such a page later reads it back from the file. The writeback limit, if set, caps it.
    ///
    /// Typical use: `vzram idle 1d && vzram writeback --type idle`.
    Writeback {
        /// Only this device [default: every device with a backing file]
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        /// Which pages
        #[arg(long = "type", value_name = "TYPE", value_enum, default_value_t = PageType::Idle)]
        page_type: PageType,
        /// Write at most this many pages
        #[arg(long, value_name = "PAGES")]
        limit: Option<u64>,
        #[command(flatten)]
        conn: Connection,
    },

    /// Set or remove the writeback budget
    ///
    /// Like zram's `writeback_limit`: writeback may write at most PAGES more pages (each
    /// page written uses one up) until the budget is set again; `none` removes the budget.
    WritebackLimit {
        /// A number of 4 KiB pages, or `none`
        #[arg(value_name = "PAGES|none", value_parser = parse_budget)]
        pages: WritebackBudget,
        /// Only this device [default: every device]
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },

    /// Set the memory limit of the store
    ///
    /// The most memory the compressed pages of all devices may take, like zram's
    /// `mem_limit`. A guest write that would exceed it fails (the guest sees an I/O error on
    /// that request, typically a swap-out error); nothing stored is lost. Lowering the limit
    /// below current use frees nothing by itself.
    MemLimit {
        /// Bytes, with an optional K, M, G or T suffix (e.g. 2G); 0 removes the limit
        #[arg(value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        conn: Connection,
    },

    /// Reset mem_used_max to the memory in use now
    ResetMemUsedMax {
        #[command(flatten)]
        conn: Connection,
    },
}

impl ClientCommand {
    fn conn(&self) -> &Connection {
        match self {
            ClientCommand::Stat { conn, .. }
            | ClientCommand::Compact { conn }
            | ClientCommand::Idle { conn, .. }
            | ClientCommand::Recompress { conn, .. }
            | ClientCommand::Writeback { conn, .. }
            | ClientCommand::WritebackLimit { conn, .. }
            | ClientCommand::MemLimit { conn, .. }
            | ClientCommand::ResetMemUsedMax { conn } => conn,
        }
    }

    /// The request this command sends.
    pub fn request(&self) -> Request {
        match self.clone() {
            ClientCommand::Stat { .. } => Request::Stat,
            ClientCommand::Compact { .. } => Request::Compact,
            ClientCommand::Idle { age, device, .. } => Request::Idle {
                device,
                age_secs: match age {
                    IdleAge::All => None,
                    IdleAge::Older(d) => Some(d.as_secs()),
                },
            },
            ClientCommand::Recompress {
                device,
                page_type,
                threshold,
                max_pages,
                priority,
                ..
            } => Request::Recompress {
                device,
                page_type,
                threshold,
                max_pages,
                priority: Some(priority),
            },
            ClientCommand::Writeback {
                device,
                page_type,
                limit,
                ..
            } => Request::Writeback {
                device,
                page_type,
                limit_pages: limit,
            },
            ClientCommand::WritebackLimit { pages, device, .. } => Request::WritebackLimit {
                device,
                pages: pages.0,
            },
            ClientCommand::MemLimit { size, .. } => Request::MemLimit { bytes: size },
            ClientCommand::ResetMemUsedMax { .. } => Request::ResetMemUsedMax,
        }
    }
}

/// A connection to the daemon's control socket.
#[derive(Debug)]
pub struct Client {
    stream: BufReader<UnixStream>,
    path: PathBuf,
    timeout_secs: u64,
}

impl Client {
    /// Connects; `timeout_secs` bounds each answer (0: no bound).
    pub fn connect(path: impl AsRef<Path>, timeout_secs: u64) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| ClientError::Connect {
            path: path.clone(),
            source,
        })?;
        let timeout = (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs));
        let set = stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout));
        set.map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Client {
            stream: BufReader::new(stream),
            path,
            timeout_secs,
        })
    }

    fn io(&self, source: io::Error) -> ClientError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout(self.timeout_secs)
            }
            _ => ClientError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Sends one line (a newline is added) and reads the response line.
    pub fn call_raw(&mut self, line: &str) -> Result<Response<serde_json::Value>, ClientError> {
        let mut msg = line.as_bytes().to_vec();
        msg.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&msg)
            .map_err(|e| self.io(e))?;
        let mut answer = String::new();
        match self.stream.read_line(&mut answer) {
            Ok(0) => return Err(ClientError::Closed),
            Ok(_) => {}
            Err(e) => return Err(self.io(e)),
        }
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(format!("{e}: {answer}")))
    }

    /// Sends a request; the daemon's `result` as `T`, or its error as [`ClientError::Server`].
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ClientError> {
        let line = serde_json::to_string(req).expect("requests serialise");
        let response = self.call_raw(&line)?;
        if !response.ok {
            return Err(ClientError::Server(
                response
                    .error
                    .unwrap_or_else(|| "request failed (no reason given)".into()),
            ));
        }
        let result = response
            .result
            .ok_or_else(|| ClientError::Protocol("no result".into()))?;
        serde_json::from_value(result).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn stat(&mut self) -> Result<StatReply, ClientError> {
        self.call(&Request::Stat)
    }
}

/// Runs a client subcommand and prints its result on stdout. The caller prints an error as
/// one line (`vzram: {error}`) and exits with status 1.
pub fn run(cmd: ClientCommand) -> Result<(), ClientError> {
    run_to(cmd, &mut io::stdout().lock())
}

/// [`run`], printing to `out`.
pub fn run_to(cmd: ClientCommand, out: &mut dyn Write) -> Result<(), ClientError> {
    let conn = cmd.conn();
    let mut client = Client::connect(conn.path(), conn.timeout_secs())?;
    let req = cmd.request();
    let mut text = match cmd {
        ClientCommand::Stat { json, .. } => {
            let r: StatReply = client.call(&req)?;
            if json {
                let mut s = serde_json::to_string_pretty(&r).expect("replies serialise");
                s.push('\n');
                s
            } else {
                table::render(&r)
            }
        }
        ClientCommand::Compact { .. } => {
            let r: CompactReply = client.call(&req)?;
            format!(
                "compaction freed {} pages ({}); {} pages compacted since the daemon started\n",
                r.pages_freed,
                human_size(r.pages_freed * zram::PAGE_SIZE as u64),
                r.pages_compacted
            )
        }
        ClientCommand::Idle { .. } => {
            let r: IdleReply = client.call(&req)?;
            r.devices
                .iter()
                .map(|d| format!("{}: {} pages marked idle\n", d.name, d.marked))
                .collect()
        }
        ClientCommand::Recompress { .. } => {
            let r: RecompressReply = client.call(&req)?;
            let mut s: String = r
                .devices
                .iter()
                .map(|d| {
                    format!(
                        "{}: {} pages tried, {} recompressed\n",
                        d.name, d.tried, d.recompressed
                    )
                })
                .collect();
            s.extend(skipped(&r.skipped));
            s
        }
        ClientCommand::Writeback { .. } => {
            let r: WritebackReply = client.call(&req)?;
            let mut s: String = r
                .devices
                .iter()
                .map(|d| {
                    format!(
                        "{}: {} pages written back ({})\n",
                        d.name,
                        d.written,
                        human_size(d.written * zram::PAGE_SIZE as u64)
                    )
                })
                .collect();
            s.extend(skipped(&r.skipped));
            s
        }
        ClientCommand::WritebackLimit { .. } => {
            let r: WritebackLimitReply = client.call(&req)?;
            let limit = match r.pages {
                Some(p) => format!("writeback limit {p} pages"),
                None => "no writeback limit".into(),
            };
            r.devices
                .iter()
                .map(|name| format!("{name}: {limit}\n"))
                .collect()
        }
        ClientCommand::MemLimit { .. } => {
            let r: MemLimitReply = client.call(&req)?;
            match r.mem_limit {
                0 => "mem_limit: none\n".to_string(),
                l => format!("mem_limit: {} ({l} bytes)\n", human_size(l)),
            }
        }
        ClientCommand::ResetMemUsedMax { .. } => {
            let r: ResetMemUsedMaxReply = client.call(&req)?;
            format!("mem_used_max reset to {}\n", human_size(r.mem_used_max))
        }
    };
    // The per-device commands list no line when the daemon has no device to act on; the
    // operator still gets an answer.
    if text.is_empty() {
        let value = serde_json::to_value(&req).expect("requests serialise");
        text = format!("{}: no device\n", value["cmd"].as_str().unwrap_or("done"));
    }
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(ClientError::Output)
}

fn skipped(list: &[Skipped]) -> impl Iterator<Item = String> + '_ {
    list.iter()
        .map(|s| format!("{}: skipped: {}\n", s.name, s.reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(name = "vzram")]
    struct Cli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("vzram").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn every_subcommand_documents_where_it_connects() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let names: Vec<String> = cli
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .filter(|n| n != "help")
            .collect();
        assert_eq!(names.len(), 8);
        for name in names {
            let help = cli
                .find_subcommand_mut(&name)
                .unwrap()
                .render_long_help()
                .to_string();
            assert!(help.contains("$VZRAM_CONTROL"), "{name}: {help}");
            assert!(help.contains(DEFAULT_CONTROL), "{name}: {help}");
        }
    }

    /// How `main` wires the client in: beside `serve`, flattened into one subcommand list.
    #[test]
    fn flattens_beside_serve() {
        use clap::{CommandFactory, Subcommand};
        #[derive(Debug, Subcommand)]
        enum Command {
            Serve(Box<crate::cli::ServeArgs>),
            #[command(flatten)]
            Client(ClientCommand),
        }
        #[derive(Debug, Parser)]
        #[command(name = "vzram")]
        struct Main {
            #[command(subcommand)]
            command: Command,
        }
        Main::command().debug_assert();
        let m = Main::try_parse_from(["vzram", "stat", "--json", "--control", "/x.ctl"]).unwrap();
        match m.command {
            Command::Client(ClientCommand::Stat { json, conn }) => {
                assert!(json);
                assert_eq!(conn.path(), PathBuf::from("/x.ctl"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn ages() {
        assert_eq!(parse_age("all"), Ok(IdleAge::All));
        assert_eq!(parse_age("90"), Ok(IdleAge::Older(Duration::from_secs(90))));
        assert_eq!(
            parse_age("30s"),
            Ok(IdleAge::Older(Duration::from_secs(30)))
        );
        assert_eq!(
            parse_age("5m"),
            Ok(IdleAge::Older(Duration::from_secs(300)))
        );
        assert_eq!(
            parse_age("1h"),
            Ok(IdleAge::Older(Duration::from_secs(3600)))
        );
        assert_eq!(
            parse_age("2D"),
            Ok(IdleAge::Older(Duration::from_secs(172800)))
        );
        for bad in ["", "h", "1.5h", "-1", "3w", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commands_map_to_requests() {
        let req = |args: &[&str]| parse(args).unwrap().request();
        assert_eq!(req(&["stat", "--json"]), Request::Stat);
        assert_eq!(
            req(&["idle", "1h", "--device", "vz1"]),
            Request::Idle {
                device: Some("vz1".into()),
                age_secs: Some(3600)
            }
        );
        assert_eq!(
            req(&["idle", "all"]),
            Request::Idle {
                device: None,
                age_secs: None
            }
        );
        assert_eq!(
            req(&["recompress"]),
            Request::Recompress {
                device: None,
                page_type: PageType::Idle,
                threshold: None,
                max_pages: None,
                priority: Some(1)
            }
        );
        assert_eq!(
            req(&[
                "recompress",
                "--type",
                "huge_idle",
                "--threshold",
                "1K",
                "--max-pages",
                "10",
                "--priority",
                "2"
            ]),
            Request::Recompress {
                device: None,
                page_type: PageType::HugeIdle,
                threshold: Some(1024),
                max_pages: Some(10),
                priority: Some(2)
            }
        );
        assert_eq!(
            req(&["writeback", "--type", "huge", "--limit", "100"]),
            Request::Writeback {
                device: None,
                page_type: PageType::Huge,
                limit_pages: Some(100)
            }
        );
        assert_eq!(
            req(&["writeback-limit", "none"]),
            Request::WritebackLimit {
                device: None,
                pages: None
            }
        );
        assert_eq!(
            req(&["mem-limit", "2G"]),
            Request::MemLimit { bytes: 2 << 30 }
        );
        assert_eq!(req(&["mem-limit", "0"]), Request::MemLimit { bytes: 0 });
        assert_eq!(req(&["reset-mem-used-max"]), Request::ResetMemUsedMax);
        assert_eq!(req(&["compact"]), Request::Compact);
    }

    #[test]
    fn bad_arguments_are_refused_by_clap() {
        for args in [
            &["mem-limit", "2X"][..],
            &["idle", "soon"],
            &["recompress", "--priority", "0"],
            &["recompress", "--priority", "4"],
            &["recompress", "--type", "cold"],
            &["writeback-limit", "many"],
            &["idle"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn control_path_precedence() {
        let explicit = Connection {
            control: Some("/tmp/x.ctl".into()),
            timeout: None,
        };
        assert_eq!(explicit.path(), PathBuf::from("/tmp/x.ctl"));
        assert_eq!(explicit.timeout_secs(), DEFAULT_TIMEOUT_SECS);
        // The environment is process-wide: only read it here, never set it.
        let want = std::env::var_os(CONTROL_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL));
        assert_eq!(Connection::default().path(), want);
    }

    #[test]
    fn unreachable_socket_is_one_clear_line() {
        let e = Client::connect("/nonexistent/vzram.ctl", 1).unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains('\n'));
        assert!(msg.contains("/nonexistent/vzram.ctl"), "{msg}");
        assert!(msg.contains("is the vzram daemon running?"), "{msg}");
    }
}
