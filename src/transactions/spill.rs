//! Spill: the raw messages of a streamed transaction kept until its
//! commit — in memory up to `postgres.stream_memory_mib`, then in a file.
//!
//! Invariant: a spill file has no name in the directory from the moment it
//! is created, so it cannot outlive the process (not even a SIGKILL);
//! messages come back once, in the order pushed.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use bytes::Bytes;

use super::AssembleError;
use crate::config::SpillSettings;
use crate::decode::Xid;

/// The raw messages of one in-progress streamed transaction.
#[derive(Debug)]
pub(super) struct StreamBuffer {
    pub(super) xid: Xid,
    memory: Vec<Bytes>,
    memory_bytes: usize,
    /// The spill directory (for messages) and the unnamed file in it.
    spill: Option<(PathBuf, BufWriter<std::fs::File>)>,
    /// Subtransactions that aborted; their messages are skipped at replay.
    pub(super) aborted: HashSet<Xid>,
    /// Messages and bytes received, for the report of a rollback.
    pub(super) received: (u64, u64),
}

impl StreamBuffer {
    pub(super) fn new(xid: Xid) -> Self {
        StreamBuffer {
            xid,
            memory: Vec::new(),
            memory_bytes: 0,
            spill: None,
            aborted: HashSet::new(),
            received: (0, 0),
        }
    }

    pub(super) fn push(
        &mut self,
        msg: Bytes,
        settings: &SpillSettings,
    ) -> Result<(), AssembleError> {
        self.received.0 += 1;
        self.received.1 += msg.len() as u64;
        if self.spill.is_none() && self.memory_bytes + msg.len() > settings.memory_limit {
            // The file has no name from the start (unlinked at creation, or
            // O_TMPFILE): however walgraph ends, even by SIGKILL, the
            // kernel frees it, and nothing is left in the directory.
            let path = settings.dir.clone();
            let spill_err = |source| AssembleError::Spill {
                path: path.clone(),
                source,
            };
            let file = tempfile::tempfile_in(&path).map_err(spill_err)?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            for m in self.memory.drain(..) {
                write_record(&mut w, &m).map_err(spill_err)?;
            }
            self.memory_bytes = 0;
            tracing::debug!(xid = self.xid, path = %path.display(), "streamed transaction spilled to disk");
            self.spill = Some((path, w));
        }
        match &mut self.spill {
            Some((path, w)) => write_record(w, &msg).map_err(|source| AssembleError::Spill {
                path: path.clone(),
                source,
            }),
            None => {
                self.memory_bytes += msg.len();
                self.memory.push(msg);
                Ok(())
            }
        }
    }

    /// Its kept messages, in order, for reading back once.
    pub(super) fn into_reader(mut self) -> Result<SpillReader, AssembleError> {
        if let Some((path, w)) = self.spill.take() {
            use std::io::Seek;
            let spill_err = |source| AssembleError::Spill {
                path: path.clone(),
                source,
            };
            let mut file = w.into_inner().map_err(|e| spill_err(e.into_error()))?;
            file.seek(std::io::SeekFrom::Start(0)).map_err(spill_err)?;
            return Ok(SpillReader::File {
                path,
                reader: BufReader::with_capacity(1 << 20, file),
            });
        }
        Ok(SpillReader::Memory(
            std::mem::take(&mut self.memory).into_iter(),
        ))
    }
}

/// Reads a streamed transaction's messages back; its spill file, which has
/// no name, is gone when this is dropped.
#[derive(Debug)]
pub(super) enum SpillReader {
    Memory(std::vec::IntoIter<Bytes>),
    File {
        /// The spill directory, for messages.
        path: PathBuf,
        reader: BufReader<std::fs::File>,
    },
}

impl SpillReader {
    /// The next message, `None` at the end.
    pub(super) fn next(&mut self) -> Result<Option<Bytes>, AssembleError> {
        match self {
            SpillReader::Memory(it) => Ok(it.next()),
            SpillReader::File { path, reader } => {
                read_record(reader).map_err(|source| AssembleError::Spill {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
}

fn write_record(w: &mut impl Write, m: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(m.len()).map_err(|_| std::io::Error::other("message over 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(m)
}

fn read_record(r: &mut impl Read) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut buf)?;
    Ok(Some(Bytes::from(buf)))
}
