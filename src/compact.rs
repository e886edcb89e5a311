//! Offline compaction: rewrites a database into a fresh directory and swaps it in.
//!
//! sled never gives back the space and the page-table entries of what was deleted: a
//! database that was migrated in place, or that churned through many messages, stays larger
//! on disk and in memory than one holding the same state written afresh. Compaction exports
//! the database ([`Queue::export`]) through an in-process pipe straight into an import
//! ([`Queue::import`]) of a new database in the sibling directory `<name>.compacting`, which
//! reproduces the state exactly, then exchanges the two directories in one atomic
//! `renameat2(RENAME_EXCHANGE)` and removes the old one.
//!
//! The source stays open, and so locked against other openers, until the exchange; the file
//! `<name>.compacting.lock` beside it keeps a second compaction out for the whole run. A
//! crash before the exchange leaves the database as it was; a crash after it leaves the
//! compacted database in place. Either way the sibling directory may remain (a partial copy,
//! or the old database): the next compaction removes it first, whatever it holds.

use std::io::{self, BufRead, ErrorKind, Read, Write};
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
pub(crate) fn staging_dir(path: &Path) -> Option<PathBuf> {
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
    let no_name = || Error::Config(format!("{} has no parent directory", path.display()));
    let parent = path.parent().ok_or_else(no_name)?;
    let staging = staging_dir(&path).ok_or_else(no_name)?;
    if device(&path)? != device(parent)? {
        return Err(Error::Config(format!(
            "{} is a mount point: the compacted copy is built beside it, on another file \
             system, and cannot be swapped in",
            path.display()
        )));
    }
    // One compaction of a database at a time: after the exchange the compacted database is
    // open to anyone while the old one still waits in `staging` to be removed, and a second
    // compaction must not take `staging` for left over then.
    let _lock = lock(&path)?;
    let source = builder(&path).sweep_interval(None).open()?;
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
        target.wait_applied()?;
        drop(target);
        // One open and close before the swap: sled's first open of a freshly written
        // database replays its whole log and keeps much more memory (1M messages: 230
        // against 155 MiB), so the server's first open should not be that one.
        let reopened = builder(&staging).sweep_interval(None).open()?;
        let bytes_after = reopened.size_on_disk()?;
        drop(reopened);
        sync_dir(&staging)?;
        exchange(&path, &staging)?;
        exchanged = true;
        sync_dir(parent)?;
        Ok((lines, bytes_after))
    })();
    drop(source);
    // Before the exchange `staging` holds a partial copy, after it the old database.
    match outcome {
        Ok((lines, bytes_after)) => {
            remove_dir_if_present(&staging).map_err(|e| {
                Error::Storage(format!(
                    "the compacted database is in place, but removing the old one at {} \
                     failed: {e}",
                    staging.display()
                ))
            })?;
            Ok(Compacted {
                lines,
                bytes_before,
                bytes_after,
                elapsed: started.elapsed(),
            })
        }
        // Kept: the swap may not be durable yet.
        Err(e) if exchanged => Err(Error::Storage(format!(
            "the compacted database is in place, but making the swap durable failed ({e}); \
             the old database is kept at {}",
            staging.display()
        ))),
        Err(e) => {
            let _ = remove_dir_if_present(&staging);
            Err(e)
        }
    }
}

fn device(p: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.dev())
}

/// Takes the compaction lock of the database at `path`: the file `<name>.compacting.lock`
/// beside it (left in place: removing a lock file races with its next taker).
#[cfg(any(target_os = "linux", target_os = "macos"))]
fn lock(path: &Path) -> Result<std::fs::File> {
    use rustix::fs::{flock, FlockOperation};
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".compacting.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.with_file_name(name))?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(Error::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(Error::Io(e.into())),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
const UNSUPPORTED: &str =
    "compaction needs an atomic directory exchange, which this platform lacks";

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn lock(_: &Path) -> Result<std::fs::File> {
    Err(Error::Storage(UNSUPPORTED.into()))
}

/// Streams an export of `source` into an import of `target`; returns the number of lines.
fn copy(source: &Queue, target: &Queue) -> Result<u64> {
    let (tx, rx) = crossbeam_channel::bounded(4);
    std::thread::scope(|s| {
        let exporter = s.spawn(move || {
            let mut w = ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            // Dropping the writer when this returns ends the import's input.
            source.export(&mut w)
        });
        let imported = {
            let mut r = ChunkReader {
                rx,
                chunk: Vec::new(),
                at: 0,
            };
            // Dropped here, so that an export still writing fails instead of waiting.
            target.import(&mut r)
        };
        let exported = exporter
            .join()
            .map_err(|_| Error::Storage("the export thread panicked".into()))?;
        match (exported, imported) {
            // The export failed on its own: that explains whatever the import saw.
            (Err(e), _) if !matches!(&e, Error::Io(io) if io.kind() == ErrorKind::BrokenPipe) => {
                Err(e)
            }
            (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
            (Ok(exported), Ok(imported)) if exported != imported => Err(Error::Storage(format!(
                "the export wrote {exported} lines but the import read {imported}"
            ))),
            (Ok(_), Ok(imported)) => Ok(imported),
        }
    })
}

/// Bytes per chunk handed from the export to the import.
const CHUNK: usize = 1 << 16;

/// The export's end of an in-process pipe (an OS pipe would raise `SIGPIPE` in a host
/// process that does not ignore it, should the import stop early).
struct ChunkWriter {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::new(ErrorKind::BrokenPipe, "the import stopped reading"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(bytes.len())
    }

    /// Sends what is buffered (the export flushes once, at its end; a failed export never
    /// sends its last, partial chunk).
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The import's end: chunks until the writer is dropped.
struct ChunkReader {
    rx: crossbeam_channel::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                // The writer is gone: the end of the input.
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.chunk[self.at..])
    }

    fn consume(&mut self, n: usize) {
        self.at = (self.at + n).min(self.chunk.len());
    }
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
    Err(Error::Storage(UNSUPPORTED.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe(capacity: usize) -> (ChunkWriter, ChunkReader) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let w = ChunkWriter {
            tx,
            buf: Vec::new(),
        };
        let r = ChunkReader {
            rx,
            chunk: Vec::new(),
            at: 0,
        };
        (w, r)
    }

    #[test]
    fn the_pipe_carries_every_byte_and_ends_when_the_writer_goes() {
        let (mut w, mut r) = pipe(2);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            for piece in sent.chunks(999) {
                w.write_all(piece).expect("write");
            }
            w.flush().expect("flush");
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).expect("read");
        writer.join().expect("writer");
        assert_eq!(got, data);
    }

    #[test]
    fn a_writer_whose_reader_is_gone_fails_instead_of_waiting() {
        let (mut w, r) = pipe(1);
        drop(r);
        let e = w.write_all(&vec![7u8; 3 * CHUNK]).expect_err("no reader");
        assert_eq!(e.kind(), ErrorKind::BrokenPipe);
    }

    #[test]
    fn one_compaction_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let held = lock(&path).expect("lock");
        match lock(&path) {
            Err(Error::InUse { path: p }) => assert_eq!(p, path),
            other => panic!("a second lock: {other:?}"),
        }
        drop(held);
        lock(&path).expect("free again");
    }

    #[test]
    fn an_unflushed_tail_is_never_sent() {
        let (mut w, mut r) = pipe(4);
        // A write that fills a chunk sends it; the next one stays buffered.
        w.write_all(&vec![1u8; CHUNK + 10]).expect("write");
        w.write_all(&[2u8; 5]).expect("write");
        // Dropped without a flush, as a failed export drops it.
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).expect("read");
        assert_eq!(got, vec![1u8; CHUNK + 10], "only what was sent");
    }
}
