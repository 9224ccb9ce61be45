//! Spill: the raw messages of a streamed transaction kept until its
//! commit — in memory up to `postgres.stream_memory_mib`, then in a file.
//!
//! Invariant: a spill file is removed when its transaction is read back,
//! aborted or dropped; messages come back once, in the order pushed.

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
    spill: Option<(PathBuf, BufWriter<std::fs::File>)>,
    /// Subtransactions that aborted; their messages are skipped at replay.
    pub(super) aborted: HashSet<Xid>,
}

impl StreamBuffer {
    pub(super) fn new(xid: Xid) -> Self {
        StreamBuffer {
            xid,
            memory: Vec::new(),
            memory_bytes: 0,
            spill: None,
            aborted: HashSet::new(),
        }
    }

    pub(super) fn push(
        &mut self,
        msg: Bytes,
        settings: &SpillSettings,
    ) -> Result<(), AssembleError> {
        if self.spill.is_none() && self.memory_bytes + msg.len() > settings.memory_limit {
            let path = settings.dir.join(format!(
                "walgraph-stream-{}-{}-{}.spill",
                std::process::id(),
                self.xid,
                fastrand::u32(..)
            ));
            let spill_err = |source| AssembleError::Spill {
                path: path.clone(),
                source,
            };
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(spill_err)?;
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
            let mut file = match w.into_inner() {
                Ok(f) => f,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(spill_err(e.into_error()));
                }
            };
            if let Err(e) = file.seek(std::io::SeekFrom::Start(0)) {
                let _ = std::fs::remove_file(&path);
                return Err(spill_err(e));
            }
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

/// Reads a streamed transaction's messages back; removes its spill file
/// when dropped.
#[derive(Debug)]
pub(super) enum SpillReader {
    Memory(std::vec::IntoIter<Bytes>),
    File {
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

impl Drop for SpillReader {
    fn drop(&mut self) {
        if let SpillReader::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for StreamBuffer {
    fn drop(&mut self) {
        if let Some((path, _)) = self.spill.take() {
            let _ = std::fs::remove_file(path);
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
