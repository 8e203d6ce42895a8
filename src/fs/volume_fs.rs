//! The `fuser` filesystem of one volume: read-only, every open direct I/O, every read served
//! through the mlocked bounce buffer.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, mpsc};
use std::time::Duration;

use dashmap::DashMap;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    Notifier, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};

use super::tree::{Kind, Tree};
use crate::secret_mem::{SecretBytes, Snapshot, with_bounce};

/// How long the kernel may cache names and attributes.
const TTL: Duration = Duration::from_secs(1);
const DIR_MODE: u16 = 0o755;
const BLOCK: u32 = 4096;

/// A snapshot and its tree: what one open handle reads from until it is closed.
pub struct View {
    pub snapshot: Arc<Snapshot>,
    tree: Tree,
}

impl View {
    pub fn new(snapshot: Arc<Snapshot>) -> Result<View, String> {
        let tree = Tree::build(&snapshot)?;
        Ok(View { snapshot, tree })
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.tree.node(ino)?;
        let (kind, perm, size, nlink) = match &node.kind {
            Kind::Dir(children) => (FileType::Directory, DIR_MODE, 0, 2 + children.len() as u32),
            Kind::File(i) => {
                let f = self.snapshot.files().get(*i)?;
                (
                    FileType::RegularFile,
                    f.mode as u16,
                    f.bytes.len() as u64,
                    1,
                )
            }
        };
        let time = self.snapshot.created();
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }
}

struct Handle {
    bytes: SecretBytes,
    ino: u64,
}

/// State shared between the mount's FUSE thread and the driver.
pub struct State {
    view: RwLock<Arc<View>>,
    handles: DashMap<u64, Handle>,
    next_fh: AtomicU64,
    notifier: OnceLock<Notifier>,
}

impl State {
    pub fn new(view: View) -> Arc<State> {
        Arc::new(State {
            view: RwLock::new(Arc::new(view)),
            handles: DashMap::new(),
            next_fh: AtomicU64::new(1),
            notifier: OnceLock::new(),
        })
    }

    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    pub fn view(&self) -> Arc<View> {
        match self.view.read() {
            Ok(v) => Arc::clone(&v),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }
}

/// Drops the page cache of released inodes from a thread of its own: the FUSE thread must
/// not wait in the kernel on pages whose reads only it can answer.
fn invalidate_later(notifier: &Notifier, ino: u64) {
    static QUEUE: OnceLock<Mutex<mpsc::Sender<(Notifier, u64)>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Notifier, u64)>();
        let spawned = std::thread::Builder::new()
            .name("secretfs-inval".into())
            .spawn(move || {
                for (notifier, ino) in rx {
                    // ENOENT (inode already forgotten) and ENOTCONN (unmounted) are fine.
                    let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the page-cache invalidation thread");
        }
        Mutex::new(tx)
    });
    if let Ok(tx) = queue.lock() {
        let _ = tx.send((notifier.clone(), ino));
    }
}

pub struct VolumeFs(pub Arc<State>);

impl Filesystem for VolumeFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let view = self.0.view();
        match view
            .tree
            .lookup(parent.0, name)
            .and_then(|ino| view.attr(ino))
        {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.view().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let view = self.0.view();
        let bytes = match view.tree.node(ino.0).map(|n| &n.kind) {
            Some(Kind::File(i)) => match view.snapshot.files().get(*i) {
                Some(f) => f.bytes.clone(),
                None => return reply.error(Errno::ENOENT),
            },
            Some(Kind::Dir(_)) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        };
        let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
        self.0.handles.insert(fh, Handle { bytes, ino: ino.0 });
        // Direct I/O: every read comes to us and nothing is left in the page cache.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(bytes) = self.0.handles.get(&fh.0).map(|h| h.bytes.clone()) else {
            return reply.error(Errno::EBADF);
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = (size as usize).min(bytes.len() - start);
        if n == 0 {
            return reply.data(&[]);
        }
        let mut reply = Some(reply);
        let served = with_bounce(n, |buf| {
            bytes.read_at(offset, buf);
            if let Some(r) = reply.take() {
                r.data(buf);
            }
        });
        if let (Err(e), Some(r)) = (served, reply) {
            tracing::error!(error = %e, "no bounce buffer for a read");
            r.error(Errno::ENOMEM);
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some((_, handle)) = self.0.handles.remove(&fh.0) {
            // A private mmap of a direct-I/O file still fills the page cache; drop it once the
            // handle (and with it every mapping) is gone.
            if let Some(n) = self.0.notifier.get() {
                invalidate_later(n, handle.ino);
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let view = self.0.view();
        let (Some(children), Some(node)) = (view.tree.children(ino.0), view.tree.node(ino.0))
        else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (node.parent, FileType::Directory, OsStr::new("..")),
        ];
        let entries = dots
            .into_iter()
            .chain(children.iter().map(|(name, &child)| {
                let kind = match view.tree.node(child).map(|n| &n.kind) {
                    Some(Kind::Dir(_)) => FileType::Directory,
                    _ => FileType::RegularFile,
                };
                (child, kind, name.as_os_str())
            }));
        for (i, (child, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.0.view().tree.len() as u64;
        reply.statfs(0, 0, 0, files, 0, BLOCK, 255, BLOCK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tree::ROOT;
    use crate::secret_mem::SnapshotBuilder;

    #[test]
    fn attributes_follow_the_snapshot() {
        let mut b = SnapshotBuilder::new(10).expect("region");
        b.add("dir/f".into(), 0o440, b"0123456789").expect("add");
        let view = View::new(Arc::new(b.finish(vec![]))).expect("view");
        let root = view.attr(ROOT).expect("root");
        assert_eq!(
            (root.kind, root.perm, root.uid),
            (FileType::Directory, 0o755, 0)
        );
        let dir = view.tree.lookup(ROOT, OsStr::new("dir")).expect("dir");
        let f = view.tree.lookup(dir, OsStr::new("f")).expect("f");
        let attr = view.attr(f).expect("attr");
        assert_eq!(
            (attr.kind, attr.perm, attr.size, attr.gid),
            (FileType::RegularFile, 0o440, 10, 0)
        );
        assert!(view.attr(42).is_none());
    }
}
