//! `inventorysync tail`: one warehouse slot to JSON lines, like `pg_recvlogical`.
//!
//! For DBAs (see what the engine would publish) and for benchmarks (drain a slot as fast as
//! the server sends). Positions are confirmed to Postgres only once the lines are written and
//! synced. Appending to an existing file resumes after the last complete line it holds: a
//! torn last line from a crash is cut off, and events at or before the last written position
//! are skipped, so the file's positions only ever grow.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::Lsn;
use crate::source::SourceError;
use crate::source::assemble::StreamItem;
use crate::source::stream::{SourceOptions, run};

/// How often a busy stream syncs its output and confirms the position to Postgres.
const CONFIRM_INTERVAL: Duration = Duration::from_millis(500);

/// Where the lines go.
#[derive(Debug, Clone)]
pub enum Output {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// An event position: `(commit_lsn, sequence)`.
pub type Position = (Lsn, u64);

/// Streams the slot into `output` until `endpos`, a signal, or a definite error.
pub async fn tail(
    opts: SourceOptions,
    output: Output,
    cancel: CancellationToken,
) -> Result<TailSummary, SourceError> {
    let (sink, resume_after) = open_output(&output)?;
    let (tx, rx) = mpsc::channel::<Vec<StreamItem>>(16);
    let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
    let writer = std::thread::Builder::new()
        .name("tail-writer".into())
        .spawn(move || write_loop(rx, sink, resume_after, durable_tx))
        .map_err(SourceError::Output)?;
    let source = run(&opts, tx, durable_rx, cancel).await;
    let written = writer
        .join()
        .map_err(|_| SourceError::Output(std::io::Error::other("writer thread panicked")))?;
    source?;
    written
}

/// What a run of `tail` did.
#[derive(Debug, Clone, Copy, Default)]
pub struct TailSummary {
    /// Events written.
    pub events: u64,
    /// Events skipped because they were already in the file.
    pub skipped: u64,
}

enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File(BufWriter<File>),
}

impl Sink {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File(w) => w,
        }
    }

    /// Makes everything written durable: flushed, and synced for files.
    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(w) => w.flush(),
            Sink::File(w) => {
                w.flush()?;
                match w.get_ref().sync_data() {
                    // Devices such as /dev/null cannot be synced and need not be.
                    Err(e) if e.raw_os_error() == Some(22) => Ok(()),
                    r => r,
                }
            }
        }
    }
}

fn open_output(output: &Output) -> Result<(Sink, Option<Position>), SourceError> {
    match output {
        Output::Stdout => Ok((
            Sink::Stdout(BufWriter::with_capacity(1 << 20, std::io::stdout())),
            None,
        )),
        Output::File(path) => {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(SourceError::Output)?;
            let last = recover_tail(&mut f).map_err(SourceError::Output)?;
            f.seek(SeekFrom::End(0)).map_err(SourceError::Output)?;
            Ok((Sink::File(BufWriter::with_capacity(1 << 20, f)), last))
        }
    }
}

/// Cuts a torn last line off and returns the position of the last complete one.
fn recover_tail(f: &mut File) -> std::io::Result<Option<Position>> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let window = len.min(16 << 20);
    f.seek(SeekFrom::Start(len - window))?;
    let mut buf = Vec::with_capacity(window as usize);
    f.take(window).read_to_end(&mut buf)?;
    let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
        if window == len {
            f.set_len(0)?;
        }
        return Ok(None);
    };
    let keep = len - window + last_nl as u64 + 1;
    if keep < len {
        f.set_len(keep)?;
    }
    let line_start = buf[..last_nl]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Ok(position_of_line(&buf[line_start..last_nl]))
}

/// The position of one written event line.
pub fn position_of_line(line: &[u8]) -> Option<Position> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let s = v.get("source")?;
    Some((
        Lsn(s.get("commit_lsn")?.as_u64()?),
        s.get("sequence")?.as_u64()?,
    ))
}

fn write_loop(
    mut rx: mpsc::Receiver<Vec<StreamItem>>,
    mut sink: Sink,
    mut last_written: Option<Position>,
    durable: watch::Sender<Lsn>,
) -> Result<TailSummary, SourceError> {
    let mut summary = TailSummary::default();
    let mut line = Vec::with_capacity(4096);
    let mut committed: Option<Lsn> = None;
    let mut last_confirm = Instant::now();
    loop {
        // A stream that never pauses must still be confirmed, or the slot retains WAL.
        if last_confirm.elapsed() >= CONFIRM_INTERVAL {
            confirm(&mut sink, &mut committed, &durable)?;
            last_confirm = Instant::now();
        }
        let batch = match rx.try_recv() {
            Ok(b) => b,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Idle: make what was written durable, then say so.
                confirm(&mut sink, &mut committed, &durable)?;
                last_confirm = Instant::now();
                match rx.blocking_recv() {
                    Some(b) => b,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        for item in batch {
            match item {
                StreamItem::Change(ev) => {
                    let pos = (ev.source.commit_lsn, ev.source.sequence);
                    if last_written.is_some_and(|l| pos <= l) {
                        summary.skipped += 1;
                        continue;
                    }
                    line.clear();
                    ev.write_json(&mut line);
                    line.push(b'\n');
                    sink.writer()
                        .write_all(&line)
                        .map_err(SourceError::Output)?;
                    last_written = Some(pos);
                    summary.events += 1;
                }
                StreamItem::Commit { end_lsn, .. } => committed = Some(end_lsn),
            }
        }
    }
    confirm(&mut sink, &mut committed, &durable)?;
    Ok(summary)
}

fn confirm(
    sink: &mut Sink,
    committed: &mut Option<Lsn>,
    durable: &watch::Sender<Lsn>,
) -> Result<(), SourceError> {
    sink.sync().map_err(SourceError::Output)?;
    if let Some(end) = committed.take() {
        durable.send_if_modified(|d| {
            let moved = end > *d;
            if moved {
                *d = end;
            }
            moved
        });
    }
    Ok(())
}
