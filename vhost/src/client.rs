//! The `vzram` command-line client: the subcommands that talk to a running daemon over its
//! control socket (see [`crate::control::proto`] for the protocol).

use crate::control::proto::*;
use crate::prometheus;
use crate::table::{self, human_size};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zram::policy::PolicyStats;

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
pub struct ControlArgs {
    /// The daemon's control socket [default: $VZRAM_CONTROL if set, else /run/vzram/vzram.ctl]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Seconds to wait for the daemon's answer; 0 waits for ever [default: 600]
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

impl ControlArgs {
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

    pub fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(self.path(), self.timeout_secs())
    }
}

/// How `vzram stat` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatFormat {
    Text,
    Json,
    Prometheus,
}

/// The subcommands that control a running daemon. Each sends its command (the arguments are
/// the command's own fields, see [`crate::control::proto`]) and prints the reply.
#[derive(Clone, Debug, PartialEq, clap::Subcommand)]
pub enum ClientCommand {
    /// Show the devices, their memory use and I/O counters
    ///
    /// A zramctl-like table (DISKSIZE: the device's size; DATA: uncompressed bytes stored;
    /// COMPR: their compressed size; TOTAL: memory the pool holds, allocator overhead
    /// included; STREAMS: queues, each with its own worker and compression stream), then for
    /// each device zram's mm_stat, io_stat and bd_stat fields under zram's names, the
    /// requests each queue served, and the store's memory limit and high-water mark.
    Stat {
        /// How to print: `text` (the table), `json` (the daemon's answer as it is), or
        /// `prometheus` (text exposition format, for node_exporter's textfile collector)
        #[arg(long, value_enum, default_value_t = StatFormat::Text)]
        format: StatFormat,
        /// Short for --format json
        #[arg(long, conflicts_with = "format")]
        json: bool,
        #[command(flatten)]
        conn: ControlArgs,
    },

    /// Compact the pool now
    ///
    /// Moves compressed pages out of partly used allocator pages so that those pages can be
    /// freed, like writing to zram's `compact`. The daemon also compacts by itself when
    /// enough pages can be freed.
    Compact(Call<Compact>),

    /// Mark stored pages idle
    ///
    /// Like zram's `idle` file: marks every stored page (`all`), or those the guest has not
    /// read or written for at least AGE. `recompress --type idle` and `writeback --type idle`
    /// then act on them. A page loses its mark when it is accessed.
    Idle(Call<Idle>),

    /// Recompress pages with a secondary algorithm
    ///
    /// Like zram's `recompress`: each matching page is compressed again with the
    /// recompression algorithm of the given priority (the daemon's --recomp, e.g. zstd) and
    /// kept only if that makes it smaller; pages that do not shrink are marked
    /// incompressible. Guest I/O goes on meanwhile. The daemon answers when the pass is done.
    ///
    /// Typical use: `vzram idle 1h && vzram recompress --type idle`.
    Recompress(Call<Recompress>),

    /// Move pages to the backing file
    ///
    /// Like zram's `writeback`: matching pages are written, compressed as they are, to the
    /// device's backing file (the daemon's --backing-file) and their memory is freed. Reading
    /// such a page later reads it back from the file. The writeback limit, if set, caps it.
    ///
    /// Typical use: `vzram idle 1d && vzram writeback --type idle`.
    Writeback(Call<Writeback>),

    /// Set or remove the writeback budget
    ///
    /// Like zram's `writeback_limit`: writeback may write at most PAGES more pages (each
    /// page written uses one up) until the budget is set again; `none` removes the budget.
    WritebackLimit(Call<WritebackLimit>),

    /// Set the memory limit of the store, or of one device
    ///
    /// The store's limit is the most memory the compressed pages of all devices may take,
    /// like zram's `mem_limit`; a device's limit (`--device`) caps that device inside it. A
    /// guest write that would exceed a limit first moves cold pages to the backing files
    /// (direct reclaim: the devices furthest above their share first); it fails only when
    /// nothing cold is left to move (the guest sees an I/O error on that request, typically
    /// a swap-out error). Nothing stored is lost. Lowering a limit below current use frees
    /// nothing by itself; the policy then writes back down to its low watermark.
    MemLimit(Call<MemLimit>),

    /// Reset mem_used_max to the memory in use now
    ResetMemUsedMax(Call<ResetMemUsedMax>),

    /// Show the tiering policy, or change it
    ///
    /// The policy compacts the pool, recompresses cold pages with the --recomp algorithm and
    /// writes cold pages back to the backing files when memory runs short, by itself. Without
    /// arguments this shows its settings and what it has done; `vzram policy off` stops it,
    /// `vzram policy on --idle-age 5m` starts it with another idle age. Changes last until the
    /// daemon stops (`vzram serve` takes the same settings).
    Policy(Box<Call<Policy>>),
}

/// A command's arguments and where to send it.
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct Call<C: clap::Args> {
    #[command(flatten)]
    pub args: C,
    #[command(flatten)]
    pub conn: ControlArgs,
}

/// How the client prints a command's reply.
pub trait Render: Command {
    /// The text for the operator; empty when the daemon had no device to act on.
    fn render(reply: &Self::Reply) -> String;
}

impl<C: Render + clap::Args> Call<C> {
    fn run(&self) -> Result<String, ClientError> {
        let text = C::render(&self.conn.connect()?.call(&self.args)?);
        // The per-device commands list no line when the daemon has no device to act on; the
        // operator still gets an answer.
        Ok(if text.is_empty() {
            format!("{}: no device\n", C::NAME)
        } else {
            text
        })
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

    /// Sends a command; the daemon's reply, or its error as [`ClientError::Server`].
    pub fn call<C: Command>(&mut self, cmd: &C) -> Result<C::Reply, ClientError> {
        let mut msg = request_line(cmd);
        msg.push('\n');
        (self.stream.get_mut().write_all(msg.as_bytes())).map_err(|e| self.io(e))?;
        let mut answer = String::new();
        match self.stream.read_line(&mut answer) {
            Ok(0) => return Err(ClientError::Closed),
            Ok(_) => {}
            Err(e) => return Err(self.io(e)),
        }
        let protocol = |e: serde_json::Error| ClientError::Protocol(format!("{e}: {answer}"));
        let response: Response<serde_json::Value> =
            serde_json::from_str(&answer).map_err(protocol)?;
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
}

/// Runs a client subcommand and prints its result on stdout. The caller prints an error as
/// one line (`vzram: {error}`) and exits with status 1.
pub fn run(cmd: ClientCommand) -> Result<(), ClientError> {
    run_to(cmd, &mut io::stdout().lock())
}

/// [`run`], printing to `out`.
pub fn run_to(cmd: ClientCommand, out: &mut dyn Write) -> Result<(), ClientError> {
    let text = match cmd {
        ClientCommand::Stat { format, json, conn } => {
            let r = conn.connect()?.call(&Stat {})?;
            match if json { StatFormat::Json } else { format } {
                StatFormat::Text => table::render(&r),
                StatFormat::Json => {
                    let mut s = serde_json::to_string_pretty(&r).expect("replies serialise");
                    s.push('\n');
                    s
                }
                StatFormat::Prometheus => prometheus::render(&r),
            }
        }
        ClientCommand::Compact(c) => c.run()?,
        ClientCommand::Idle(c) => c.run()?,
        ClientCommand::Recompress(c) => c.run()?,
        ClientCommand::Writeback(c) => c.run()?,
        ClientCommand::WritebackLimit(c) => c.run()?,
        ClientCommand::MemLimit(c) => c.run()?,
        ClientCommand::ResetMemUsedMax(c) => c.run()?,
        ClientCommand::Policy(c) => c.run()?,
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(ClientError::Output)
}

impl Render for Compact {
    fn render(r: &CompactReply) -> String {
        format!(
            "compaction freed {} pages ({}); {} pages compacted since the daemon started\n",
            r.pages_freed,
            human_size(r.pages_freed * zram::PAGE_SIZE as u64),
            r.pages_compacted
        )
    }
}

/// A line per device, then one per device skipped.
fn per_device<T>(r: &Devices<T>, line: impl Fn(&T) -> String) -> String {
    let skipped = (r.skipped.iter()).map(|s| format!("{}: skipped: {}\n", s.name, s.reason));
    r.devices.iter().map(line).chain(skipped).collect()
}

impl Render for Idle {
    fn render(r: &Devices<IdleDevice>) -> String {
        per_device(r, |d| {
            format!("{}: {} pages marked idle\n", d.name, d.marked)
        })
    }
}

impl Render for Recompress {
    fn render(r: &Devices<RecompressDevice>) -> String {
        per_device(r, |d| {
            format!(
                "{}: {} pages tried, {} recompressed\n",
                d.name, d.tried, d.recompressed
            )
        })
    }
}

impl Render for Writeback {
    fn render(r: &Devices<WritebackDevice>) -> String {
        per_device(r, |d| {
            let size = human_size(d.written * zram::PAGE_SIZE as u64);
            format!("{}: {} pages written back ({size})\n", d.name, d.written)
        })
    }
}

impl Render for WritebackLimit {
    fn render(r: &WritebackLimitReply) -> String {
        let limit = match r.pages {
            Some(p) => format!("writeback limit {p} pages"),
            None => "no writeback limit".into(),
        };
        r.devices
            .iter()
            .map(|d| format!("{d}: {limit}\n"))
            .collect()
    }
}

impl Render for MemLimit {
    fn render(r: &MemLimitReply) -> String {
        let whose = match &r.device {
            Some(d) => format!("{d}: "),
            None => String::new(),
        };
        let limit = match r.mem_limit {
            0 => "none".to_string(),
            l => format!("{} ({l} bytes)", human_size(l)),
        };
        format!(
            "{whose}mem_limit: {limit}, in use {}\n",
            human_size(r.mem_used)
        )
    }
}

impl Render for Policy {
    fn render(r: &PolicyStats) -> String {
        table::policy(r)
    }
}

impl Render for ResetMemUsedMax {
    fn render(r: &ResetMemUsedMaxReply) -> String {
        format!("mem_used_max reset to {}\n", human_size(r.mem_used_max))
    }
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
        assert_eq!(names.len(), 9);
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
            Serve(Box<crate::config::ServeArgs>),
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
            Command::Client(ClientCommand::Stat { json, conn, .. }) => {
                assert!(json);
                assert_eq!(conn.path(), PathBuf::from("/x.ctl"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commands_send_their_request_lines() {
        let line = |args: &[&str]| match parse(args).unwrap() {
            ClientCommand::Stat { .. } => request_line(&Stat {}),
            ClientCommand::Compact(c) => request_line(&c.args),
            ClientCommand::Idle(c) => request_line(&c.args),
            ClientCommand::Recompress(c) => request_line(&c.args),
            ClientCommand::Writeback(c) => request_line(&c.args),
            ClientCommand::WritebackLimit(c) => request_line(&c.args),
            ClientCommand::MemLimit(c) => request_line(&c.args),
            ClientCommand::ResetMemUsedMax(c) => request_line(&c.args),
            ClientCommand::Policy(c) => request_line(&c.args),
        };
        for (args, want) in [
            (&["stat", "--json"][..], r#"{"cmd":"stat"}"#),
            (&["compact"], r#"{"cmd":"compact"}"#),
            (&["policy"], r#"{"cmd":"policy"}"#),
            (
                &[
                    "policy",
                    "off",
                    "--idle-age",
                    "5m",
                    "--high-watermark",
                    "0.85",
                ],
                r#"{"cmd":"policy","enabled":false,"idle_age_secs":300,"high_watermark":0.85}"#,
            ),
            (
                &["mem-limit", "--device", "vm1", "1G"],
                r#"{"cmd":"mem_limit","device":"vm1","bytes":1073741824}"#,
            ),
            (
                &["idle", "1h", "--device", "vz1"],
                r#"{"cmd":"idle","device":"vz1","age_secs":3600}"#,
            ),
            (&["idle", "all"], r#"{"cmd":"idle"}"#),
            (&["idle", "90"], r#"{"cmd":"idle","age_secs":90}"#),
            (&["idle", "30s"], r#"{"cmd":"idle","age_secs":30}"#),
            (&["idle", "5m"], r#"{"cmd":"idle","age_secs":300}"#),
            (&["idle", "2D"], r#"{"cmd":"idle","age_secs":172800}"#),
            (
                &["recompress"],
                r#"{"cmd":"recompress","type":"idle","priority":1}"#,
            ),
            (
                &[
                    "recompress",
                    "--type",
                    "huge-idle",
                    "--threshold",
                    "1K",
                    "--max-pages",
                    "10",
                    "--priority",
                    "2",
                ],
                r#"{"cmd":"recompress","type":"huge_idle","threshold":1024,"max_pages":10,"priority":2}"#,
            ),
            (
                &["writeback", "--type", "huge", "--limit", "100"],
                r#"{"cmd":"writeback","type":"huge","limit_pages":100}"#,
            ),
            (
                &["writeback-limit", "none", "--device", "vz0"],
                r#"{"cmd":"writeback_limit","device":"vz0","pages":null}"#,
            ),
            (
                &["writeback-limit", "7"],
                r#"{"cmd":"writeback_limit","pages":7}"#,
            ),
            (
                &["mem-limit", "2G"],
                r#"{"cmd":"mem_limit","bytes":2147483648}"#,
            ),
            (&["mem-limit", "0"], r#"{"cmd":"mem_limit","bytes":0}"#),
            (&["reset-mem-used-max"], r#"{"cmd":"reset_mem_used_max"}"#),
        ] {
            assert_eq!(line(args), want, "{args:?}");
        }
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
            &["writeback-limit"],
            &["idle"],
            &["idle", ""],
            &["idle", "h"],
            &["idle", "1.5h"],
            &["idle", "-1"],
            &["idle", "3w"],
            &["idle", "99999999999999999999d"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn control_path_precedence() {
        let explicit = ControlArgs {
            control: Some("/tmp/x.ctl".into()),
            timeout: None,
        };
        assert_eq!(explicit.path(), PathBuf::from("/tmp/x.ctl"));
        assert_eq!(explicit.timeout_secs(), DEFAULT_TIMEOUT_SECS);
        // The environment is process-wide: only read it here, never set it.
        let want = std::env::var_os(CONTROL_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL));
        assert_eq!(ControlArgs::default().path(), want);
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
