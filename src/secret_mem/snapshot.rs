use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::SystemTime;

use super::region::SealedRegion;
use super::{Error, MemoryKind, Region};

/// One object the provider reported, with its version. Not secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectVersion {
    pub id: String,
    pub version: String,
}

/// One file's bytes inside a snapshot's region. Cannot be printed; read with [`Self::read_at`].
#[derive(Clone)]
pub struct SecretBytes {
    region: Arc<SealedRegion>,
    offset: usize,
    len: usize,
}

impl SecretBytes {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the bytes at `offset..` into `out`; returns how many were copied (0 at or past
    /// the end).
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> usize {
        let bytes = self.expose();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = out.len().min(bytes.len() - start);
        out[..n].copy_from_slice(&bytes[start..start + n]);
        n
    }

    /// The bytes themselves, for code that compares or copies them inside secret memory.
    pub fn expose(&self) -> &[u8] {
        &self.region.as_slice()[self.offset..self.offset + self.len]
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.len)
    }
}

/// A file of a snapshot: its relative path, permission bits and bytes.
#[derive(Clone, Debug)]
pub struct SecretFile {
    pub path: String,
    pub mode: u32,
    pub bytes: SecretBytes,
}

/// Every file of one provider response, held in one secret-memory region. The region is
/// zeroized and unmapped when the snapshot and every `SecretBytes` taken from it are gone.
#[derive(Debug)]
pub struct Snapshot {
    region: Arc<SealedRegion>,
    files: Vec<SecretFile>,
    versions: Vec<ObjectVersion>,
    kind: MemoryKind,
    region_bytes: usize,
    created: SystemTime,
}

impl Snapshot {
    pub fn files(&self) -> &[SecretFile] {
        &self.files
    }

    pub fn versions(&self) -> &[ObjectVersion] {
        &self.versions
    }

    pub fn memory_kind(&self) -> MemoryKind {
        self.kind
    }

    /// Bytes of secret memory this snapshot holds (whole pages).
    pub fn region_bytes(&self) -> usize {
        self.region_bytes
    }

    pub fn created(&self) -> SystemTime {
        self.created
    }

    /// Where each file sits in the region: path, mode, offset, length. Not secret.
    pub fn layout(&self) -> Vec<FileLayout> {
        self.files
            .iter()
            .map(|f| FileLayout {
                path: f.path.clone(),
                mode: f.mode,
                offset: f.bytes.offset,
                len: f.bytes.len,
            })
            .collect()
    }

    /// The memfd of the region, when it is memfd_secret memory (which can be handed to
    /// another process without copying its bytes).
    pub fn region_fd(&self) -> Option<BorrowedFd<'_>> {
        self.region.fd()
    }

    /// A snapshot over a memfd_secret region another driver process filled: `region_len`
    /// bytes, files where `layout` says. Fails if the layout does not fit the region.
    pub fn adopt(
        fd: OwnedFd,
        region_len: usize,
        layout: Vec<FileLayout>,
        versions: Vec<ObjectVersion>,
    ) -> Result<Snapshot, Error> {
        for f in &layout {
            let end = f.offset.saturating_add(f.len);
            if end > region_len {
                return Err(Error::Overflow {
                    needed: end,
                    capacity: region_len,
                });
            }
        }
        let region = Arc::new(Region::from_secretmem_fd(fd, region_len)?.seal());
        let files = layout
            .into_iter()
            .map(|f| SecretFile {
                path: f.path,
                mode: f.mode,
                bytes: SecretBytes {
                    region: Arc::clone(&region),
                    offset: f.offset,
                    len: f.len,
                },
            })
            .collect();
        Ok(Snapshot {
            region,
            files,
            versions,
            kind: MemoryKind::SecretMem,
            region_bytes: region_len,
            created: SystemTime::now(),
        })
    }
}

/// Where one file of a snapshot sits in its region.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileLayout {
    pub path: String,
    pub mode: u32,
    pub offset: usize,
    pub len: usize,
}

/// Copies files into a fresh region sized for all of them, then seals it.
pub struct SnapshotBuilder {
    region: Region,
    used: usize,
    files: Vec<(String, u32, usize, usize)>,
}

impl SnapshotBuilder {
    /// Reserves secret memory for `total` bytes of contents.
    pub fn new(total: usize) -> Result<Self, Error> {
        Ok(SnapshotBuilder {
            region: Region::new(total)?,
            used: 0,
            files: Vec::new(),
        })
    }

    /// Copies `contents` into the region as the file `path`.
    pub fn add(&mut self, path: String, mode: u32, contents: &[u8]) -> Result<(), Error> {
        let needed = self.used + contents.len();
        if needed > self.region.len() {
            return Err(Error::Overflow {
                needed,
                capacity: self.region.len(),
            });
        }
        self.region.as_mut_slice()[self.used..needed].copy_from_slice(contents);
        self.files.push((path, mode, self.used, contents.len()));
        self.used = needed;
        Ok(())
    }

    pub fn finish(self, versions: Vec<ObjectVersion>) -> Snapshot {
        let kind = self.region.kind();
        let region_bytes = self.region.len();
        let region = Arc::new(self.region.seal());
        let files = self
            .files
            .into_iter()
            .map(|(path, mode, offset, len)| SecretFile {
                path,
                mode,
                bytes: SecretBytes {
                    region: Arc::clone(&region),
                    offset,
                    len,
                },
            })
            .collect();
        Snapshot {
            region,
            files,
            versions,
            kind,
            region_bytes,
            created: SystemTime::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_read_back_exactly() {
        let mut b = SnapshotBuilder::new(11).expect("region");
        b.add("a".into(), 0o644, b"hello").expect("add");
        b.add("b/c".into(), 0o400, b"world!").expect("add");
        let s = b.finish(vec![ObjectVersion {
            id: "a".into(),
            version: "1".into(),
        }]);
        assert_eq!(s.files()[0].bytes.expose(), b"hello");
        assert_eq!(s.files()[1].bytes.expose(), b"world!");
        let mut out = [0u8; 4];
        assert_eq!(s.files()[1].bytes.read_at(3, &mut out), 3);
        assert_eq!(&out[..3], b"ld!");
        assert_eq!(s.files()[1].bytes.read_at(99, &mut out), 0);
        assert!(!format!("{s:?}").contains("hello"));
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let mut b = SnapshotBuilder::new(1).expect("region");
        let page = b.region.len();
        let big = vec![1u8; page + 1];
        assert!(matches!(
            b.add("x".into(), 0o644, &big),
            Err(Error::Overflow { .. })
        ));
    }
}
