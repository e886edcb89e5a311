//! `cleanup-queue`: the command-line tool for a cleanup-queue database.
//!
//! It has no queue logic of its own: it parses the command line, calls the library and prints.
//! Exit codes: 0 success, 1 a check failed (simulate's audit, `verify`, a message that is not
//! there), 2 an error (bad arguments, missing or busy database, unreadable file, storage error).

mod commands;
mod report;
mod rng;
mod simulate;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cleanup_queue::{CleanupKind, Durability, Error, Queue};
use uuid::Uuid;

/// Inspect, repair, back up and load-test an embedded cleanup-queue database.
#[derive(Debug, Parser)]
#[command(name = "cleanup-queue", version, propagate_version = true)]
#[command(after_help = "Exit codes: 0 ok, 1 a check failed (audit, verify, not found), 2 error.")]
struct Cli {
    /// The database directory. Required by every command but `simulate` (which uses a fresh
    /// temporary directory without it). Inspection commands never create a database.
    #[arg(long, global = true, value_name = "PATH")]
    db: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a production-shaped workload against the engine and audit the outcome (the main job).
    Simulate(simulate::SimulateArgs),
    /// Per-pool depths, ages, lease expiries and wakeup sequences; metrics.
    Stats(StatsArgs),
    /// Inspect a single message.
    #[command(subcommand)]
    Message(MessageCommand),
    /// Inspect and redrive the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Check every record and index against each other; exit 1 on any violation.
    Verify(JsonArg),
    /// Remove acked tombstones older than a retention, now.
    Prune(PruneArgs),
    /// Write the whole state as JSON lines (a backup).
    Export(ExportArgs),
    /// Load an export into a new, empty database.
    Import(ImportArgs),
    /// Rewrite the database into a fresh directory and swap it in, giving back the space and
    /// memory sled keeps for deleted data (offline: stop the server first).
    Compact(JsonArg),
}

#[derive(Debug, Args)]
struct JsonArg {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// Machine-readable output.
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Prometheus text exposition format: the engine's counters plus depth and age gauges.
    #[arg(long)]
    prometheus: bool,
}

#[derive(Debug, Subcommand)]
enum MessageCommand {
    /// Show an active (visible or reserved) or dead-lettered message.
    Show(PoolIdArgs),
}

#[derive(Debug, Args)]
struct PoolIdArgs {
    /// The work pool id.
    #[arg(value_name = "POOL", value_parser = parse_uuid)]
    pool: Uuid,
    /// The message id.
    #[arg(value_name = "ID", value_parser = parse_uuid)]
    id: Uuid,
    /// Machine-readable output (includes the full reservation token).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters.
    List(DlqListArgs),
    /// Show one dead letter, with its payload and redrive history.
    Show(PoolIdArgs),
    /// Move dead letters back to the queue (visible, at the back), recording who and why.
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
struct DlqListArgs {
    /// Only this work pool.
    #[arg(long, value_parser = parse_uuid)]
    pool: Option<Uuid>,
    /// Only this cleanup kind (cancelling_timeout_teardown.v1 or pending_claim_teardown.v1).
    #[arg(long, value_parser = parse_kind)]
    kind: Option<CleanupKind>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["message", "all"])))]
struct RedriveArgs {
    /// The work pool.
    #[arg(long, value_parser = parse_uuid)]
    pool: Uuid,
    /// One dead letter.
    #[arg(long, value_parser = parse_uuid)]
    message: Option<Uuid>,
    /// Every dead letter of the pool.
    #[arg(long)]
    all: bool,
    /// Why (kept in the audit record of each message).
    #[arg(long)]
    reason: String,
    /// Set the delivery count back to 0 (otherwise a message at the maximum goes straight back
    /// to the DLQ at its next reserve).
    #[arg(long)]
    reset_count: bool,
    /// Who (default: $USER@hostname, or "cli").
    #[arg(long)]
    actor: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PruneArgs {
    /// Remove tombstones completed at least this long ago (seconds, or 90s / 15m / 2h / 7d).
    #[arg(long, value_parser = parse_duration)]
    retention: Duration,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Write to this file (replaced atomically) instead of standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The export file (JSON lines).
    #[arg(long, short)]
    input: PathBuf,
}

/// Why the tool stops without success.
#[derive(Debug)]
pub enum Fail {
    /// An error: exit 2 with one line.
    Error(String),
    /// A check failed: exit 1 (whatever explains it was printed already, or is this line).
    Check(Option<String>),
}

impl Fail {
    pub fn error(msg: impl Into<String>) -> Fail {
        Fail::Error(msg.into())
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Error(match e {
            Error::InUse { path } => format!(
                "the database at {} is in use by another process (a running server or \
                 another cleanup-queue command); stop it or work on a copy",
                path.display()
            ),
            Error::Poisoned(d) => format!("the engine stopped after a storage failure: {d}"),
            other => other.to_string(),
        })
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        Fail::Error(format!("I/O error: {e}"))
    }
}

pub type CliResult<T = ()> = Result<T, Fail>;

fn main() -> ExitCode {
    // The tool never shows a backtrace: a bug reaches the user as one line.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("cleanup-queue: internal error: {what}{at}");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
            }
            eprintln!("cleanup-queue: error: {} (see --help)", one_line(&e));
            return ExitCode::from(2);
        }
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Fail::Check(msg))) => {
            if let Some(m) = msg {
                eprintln!("cleanup-queue: {m}");
            }
            ExitCode::from(1)
        }
        Ok(Err(Fail::Error(msg))) => {
            eprintln!("cleanup-queue: error: {msg}");
            ExitCode::from(2)
        }
        Err(_) => ExitCode::from(3),
    }
}

fn run(cli: Cli) -> CliResult {
    let db = cli.db;
    let need_db = |name: &str| -> CliResult<PathBuf> {
        db.clone()
            .ok_or_else(|| Fail::error(format!("`{name}` needs --db PATH")))
    };
    match cli.command {
        Command::Simulate(args) => simulate::run(db, args),
        Command::Stats(a) => {
            commands::stats(&open_existing(&need_db("stats")?)?, a.json, a.prometheus)
        }
        Command::Message(MessageCommand::Show(a)) => commands::message_show(
            &open_existing(&need_db("message show")?)?,
            a.pool,
            a.id,
            a.json,
        ),
        Command::Dlq(DlqCommand::List(a)) => commands::dlq_list(
            &open_existing(&need_db("dlq list")?)?,
            a.pool,
            a.kind,
            a.limit,
            a.json,
        ),
        Command::Dlq(DlqCommand::Show(a)) => {
            commands::dlq_show(&open_existing(&need_db("dlq show")?)?, a.pool, a.id, a.json)
        }
        Command::Dlq(DlqCommand::Redrive(a)) => {
            let queue = open_existing(&need_db("dlq redrive")?)?;
            let actor = a.actor.unwrap_or_else(default_actor);
            if a.reason.trim().is_empty() {
                return Err(Fail::error("--reason must not be empty"));
            }
            if actor.trim().is_empty() {
                return Err(Fail::error("--actor must not be empty"));
            }
            let target = match a.message {
                Some(id) => cleanup_queue::RedriveTarget::Message(id),
                None => cleanup_queue::RedriveTarget::All,
            };
            commands::redrive(
                &queue,
                a.pool,
                target,
                &a.reason,
                &actor,
                a.reset_count,
                a.json,
            )
        }
        Command::Verify(a) => commands::verify(&open_existing(&need_db("verify")?)?, a.json),
        Command::Prune(a) => {
            commands::prune(&open_existing(&need_db("prune")?)?, a.retention, a.json)
        }
        Command::Export(a) => commands::export(&open_existing(&need_db("export")?)?, a.output),
        Command::Import(a) => commands::import(&need_db("import")?, &a.input),
        Command::Compact(a) => {
            let path = need_db("compact")?;
            check_existing(&path)?;
            commands::compact(&path, a.json)
        }
    }
}

/// A clap error as one line: the message without the usage block and the help hint.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let body = text
        .split("\n\nUsage:")
        .next()
        .unwrap_or("")
        .split("\n\nFor more information")
        .next()
        .unwrap_or("");
    let joined = body.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

/// Opens an existing database for inspection or repair: never creates one, never runs the
/// sweeper (so looking at a database does not change it).
pub fn open_existing(path: &Path) -> CliResult<Queue> {
    check_existing(path)?;
    Ok(Queue::builder(path).sweep_interval(None).open()?)
}

/// Refuses a path that holds no database (opening it would create one).
fn check_existing(path: &Path) -> CliResult {
    if !path.exists() {
        return Err(Fail::error(format!(
            "no database at {}: the path does not exist",
            path.display()
        )));
    }
    if !path.is_dir() || !path.join("db").is_file() {
        return Err(Fail::error(format!(
            "{} is not a cleanup-queue database (no `db` file in it)",
            path.display()
        )));
    }
    Ok(())
}

/// `$USER@hostname`, or `cli`.
fn default_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    match (user, host) {
        (Some(u), Some(h)) => format!("{u}@{h}"),
        (Some(u), None) => u,
        _ => "cli".into(),
    }
}

/// Writes `text` to standard output; a closed pipe (`| head`) is not an error.
pub fn emit(text: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Writes a JSON value, pretty, to standard output.
pub fn emit_json(v: &serde_json::Value) -> CliResult {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Fail::error(e.to_string()))?;
    s.push('\n');
    emit(&s)
}

/// Whether progress bars may draw (standard error is a terminal).
pub fn progress_allowed() -> bool {
    std::io::stderr().is_terminal()
}

pub fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s.trim()).map_err(|_| format!("{s:?} is not a UUID"))
}

fn parse_kind(s: &str) -> Result<CleanupKind, String> {
    s.parse::<CleanupKind>().map_err(|e| e.to_string())
}

/// Seconds (`90`, `0.5`) or a number with a unit: `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30, 90s, 15m, 2h, 7d)"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("{s:?} is out of range"))
}

pub fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "fsync" => Ok(Durability::Fsync),
        "flush" => Ok(Durability::Flush),
        "buffered" => Ok(Durability::Buffered {
            every: Duration::from_millis(500),
        }),
        _ => Err(format!(
            "unknown durability {s:?}; expected fsync, flush or buffered"
        )),
    }
}
