//! Offline compaction: rewrites a database into a fresh directory and swaps it in.
//!
//! sled never gives back the space and the page-table entries of what was deleted: a
//! database that was migrated in place, or that churned through many messages, stays larger
//! on disk and in memory than one holding the same state written afresh. Compaction exports
//! the database ([`Queue::export`]) straight into an import ([`Queue::import`]) of a new
//! database in the sibling directory `<name>.compacting`, which reproduces the state exactly,
//! then exchanges the two directories in one atomic `renameat2(RENAME_EXCHANGE)` and removes
//! the old one.
//!
//! The source stays open, and so locked against other openers, until the exchange. A crash
//! before the exchange leaves the database as it was; a crash after it leaves the compacted
//! database in place. Either way the sibling directory may remain (a partial copy, or the
//! old database): the next compaction removes it first.

use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::{Queue, QueueBuilder};
use crate::error::{Error, Result};
use crate::store::Durability;

/// What a compaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compacted {
    /// Lines of the export that were carried over (meta, messages, wakeups, metrics,
    /// redrives).
    pub lines: u64,
    /// `size_on_disk` of the database before.
    pub bytes_before: u64,
    /// `size_on_disk` of the compacted database.
    pub bytes_after: u64,
    /// How long the compaction took.
    pub elapsed: Duration,
}

/// The sibling directory a compaction of `path` builds in.
pub fn staging_dir(path: &Path) -> Option<PathBuf> {
    let mut name = path.file_name()?.to_os_string();
    name.push(".compacting");
    Some(path.with_file_name(name))
}

/// Compacts the database at `path` (it must exist); `builder(p)` opens the database at `p`
/// with the caller's settings.
pub(crate) fn run(path: &Path, builder: impl Fn(&Path) -> QueueBuilder) -> Result<Compacted> {
    let started = Instant::now();
    if !path.join("db").is_file() {
        return Err(Error::Config(format!(
            "{} is not a database directory",
            path.display()
        )));
    }
    // The real directory: exchanging a symbolic link would leave the old database behind.
    let path = std::fs::canonicalize(path)?;
    let staging = staging_dir(&path)
        .ok_or_else(|| Error::Config(format!("{} has no directory name", path.display())))?;
    let source = builder(&path).sweep_interval(None).open()?;
    // Holding the source's lock: no other compaction of it is in progress, so whatever is
    // there is left over.
    remove_dir_if_present(&staging)?;
    let bytes_before = source.size_on_disk()?;
    // `Fsync` whatever the caller's mode: the copy must be on disk before it is swapped in.
    let target = builder(&staging)
        .sweep_interval(None)
        .durability(Durability::Fsync)
        .open()?;
    let mut exchanged = false;
    let outcome = (|| {
        let lines = copy(&source, &target)?;
        let bytes_after = target.size_on_disk()?;
        target.wait_applied()?;
        drop(target);
        // One open and close before the swap: sled's first open of a freshly written
        // database replays its whole log and keeps much more memory (1M messages: 230
        // against 170 MiB), so the server's first open should not be that one.
        drop(builder(&staging).sweep_interval(None).open()?);
        sync_dir(&staging)?;
        exchange(&path, &staging)?;
        exchanged = true;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok((lines, bytes_after))
    })();
    drop(source);
    // Before the exchange `staging` holds a partial copy, after it the old database.
    let removed = remove_dir_if_present(&staging);
    let (lines, bytes_after) = match outcome {
        Ok(done) => done,
        Err(e) if exchanged => {
            return Err(Error::Storage(format!(
                "the compacted database is in place, but making the swap durable failed: {e}"
            )))
        }
        Err(e) => return Err(e),
    };
    removed?;
    Ok(Compacted {
        lines,
        bytes_before,
        bytes_after,
        elapsed: started.elapsed(),
    })
}

/// Streams an export of `source` into an import of `target` through a pipe; returns the
/// number of lines.
fn copy(source: &Queue, target: &Queue) -> Result<u64> {
    let (reader, writer) = std::io::pipe()?;
    std::thread::scope(|s| {
        let exporter = s.spawn(move || {
            let mut w = BufWriter::with_capacity(1 << 16, writer);
            // The writer (and the pipe's write end) is dropped when this returns, which
            // ends the import's input.
            source.export(&mut w)
        });
        let imported = target.import(&mut BufReader::with_capacity(1 << 16, reader));
        let exported = exporter
            .join()
            .map_err(|_| Error::Storage("the export thread panicked".into()))?;
        // An export error explains an import that stopped early; report it first.
        let exported = exported?;
        let imported = imported?;
        if exported != imported {
            return Err(Error::Storage(format!(
                "the export wrote {exported} lines but the import read {imported}"
            )));
        }
        Ok(imported)
    })
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => Ok(other?),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Swaps the directory entries `a` and `b` atomically.
#[cfg(any(target_os = "linux", target_os = "macos"))]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(|e| {
        Error::Storage(format!(
            "cannot exchange the compacted copy with the database (an atomic exchange \
             needs Linux 3.15 and a file system that supports it): {e}"
        ))
    })
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn exchange(_: &Path, _: &Path) -> Result<()> {
    Err(Error::Storage(
        "compaction needs an atomic directory exchange, which this platform lacks".into(),
    ))
}
