//! The `fuser` filesystem of one volume: read-only for everyone but the driver's own swap of
//! `..data`; every open direct I/O; every read served through the mlocked bounce buffer.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, mpsc};
use std::time::{Duration, SystemTime};

use dashmap::{DashMap, DashSet};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use super::access::{AuditLog, Caller, Ownership, Settings};
use super::tree::{DATA, DATA_TMP, Inodes, Kind, ROOT, Tree, version_name};
use crate::secret_mem::{SecretBytes, Snapshot, with_bounce};

/// How long the kernel may cache names and attributes. A swap invalidates what changed, so
/// this only bounds staleness if an invalidation is lost.
const TTL: Duration = Duration::from_secs(1);
const DIR_MODE: u16 = 0o755;
const BLOCK: u32 = 4096;

/// One version of the volume: a snapshot and its tree. Open handles keep theirs alive.
pub struct View {
    pub snapshot: Arc<Snapshot>,
    pub tree: Tree,
    owner: Ownership,
    /// The inode allocator as it was before this view was built: building the same snapshot
    /// under the same version name from it gives the same inode numbers.
    pub base: Inodes,
}

impl View {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.tree.node(ino)?;
        let (kind, perm, size, nlink) = match &node.kind {
            Kind::Dir(children) => (FileType::Directory, DIR_MODE, 0, 2 + children.len() as u32),
            Kind::File(i) => {
                let f = self.snapshot.files().get(*i)?;
                (
                    FileType::RegularFile,
                    self.owner.file_perm(f.mode),
                    f.bytes.len() as u64,
                    1,
                )
            }
            Kind::Symlink(target) => (FileType::Symlink, 0o777, target.len() as u64, 1),
        };
        Some(file_attr(
            ino,
            kind,
            perm,
            size,
            nlink,
            self.snapshot.created(),
            &self.owner,
        ))
    }
}

fn file_attr(
    ino: u64,
    kind: FileType,
    perm: u16,
    size: u64,
    nlink: u32,
    time: SystemTime,
    owner: &Ownership,
) -> FileAttr {
    FileAttr {
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
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: BLOCK,
        flags: 0,
    }
}

/// How many replaced versions keep their directories resolvable.
const RETIRED_GENERATIONS: usize = 2;

struct Retired {
    name: OsString,
    data_link: u64,
    vdir: u64,
    dirs: HashMap<u64, String>,
}

struct Handle {
    bytes: SecretBytes,
    ino: u64,
    mode: u32,
    time: SystemTime,
}

/// State shared between the mount's FUSE thread and the driver.
pub struct State {
    current: RwLock<Arc<View>>,
    /// The next version while a swap is in flight (served as `..data_tmp`).
    pending: Mutex<Option<Arc<View>>>,
    /// Whether the driver has created `..data_tmp` for the pending version yet; before that
    /// the name does not exist (so that creating it succeeds).
    tmp_linked: AtomicBool,
    inodes: Mutex<Inodes>,
    /// Directories of the last few replaced versions. A path walk that raced a swap (it read
    /// `..data` just before) resolves names in them against the current version instead of
    /// failing with ENOENT.
    retired: Mutex<VecDeque<Retired>>,
    handles: DashMap<u64, Handle>,
    /// Handles the driver opened for writing, to signal a rotated file (see `touch_changed`).
    touches: DashSet<u64>,
    /// Handles through which the kernel filled its page cache (see `read`): their inode's
    /// cached pages are dropped when they are released.
    cached: DashSet<u64>,
    next_fh: AtomicU64,
    notifier: OnceLock<Notifier>,
    settings: Settings,
    audit: AuditLog,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    pub fn new(snapshot: Arc<Snapshot>, settings: Settings) -> Result<Arc<State>, String> {
        let mut inodes = Inodes::default();
        let name = version_name(snapshot.created());
        let view = build(snapshot, &mut inodes, name, settings.owner)?;
        State::with_view(view, inodes, settings)
    }

    /// The state a previous driver process had: the same tree, with the same inode numbers,
    /// under the same version name (the kernel still caches those names and numbers).
    pub fn resume(
        snapshot: Arc<Snapshot>,
        settings: Settings,
        mut inodes: Inodes,
        version: String,
        first_handle: u64,
    ) -> Result<Arc<State>, String> {
        let view = build(snapshot, &mut inodes, version, settings.owner)?;
        let state = State::with_view(view, inodes, settings)?;
        state.next_fh.store(first_handle, Ordering::Relaxed);
        Ok(state)
    }

    fn with_view(
        view: Arc<View>,
        inodes: Inodes,
        settings: Settings,
    ) -> Result<Arc<State>, String> {
        Ok(Arc::new(State {
            current: RwLock::new(view),
            pending: Mutex::new(None),
            tmp_linked: AtomicBool::new(false),
            inodes: Mutex::new(inodes),
            retired: Mutex::new(VecDeque::new()),
            handles: DashMap::new(),
            touches: DashSet::new(),
            cached: DashSet::new(),
            next_fh: AtomicU64::new(1),
            notifier: OnceLock::new(),
            settings,
            audit: AuditLog::default(),
        }))
    }

    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    pub fn notifier(&self) -> Option<&Notifier> {
        self.notifier.get()
    }

    pub fn view(&self) -> Arc<View> {
        match self.current.read() {
            Ok(v) => Arc::clone(&v),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn pending(&self) -> Option<Arc<View>> {
        lock(&self.pending).clone()
    }

    /// Builds the view of `snapshot` and stages it as the pending version.
    pub fn stage(&self, snapshot: Arc<Snapshot>) -> Result<Arc<View>, String> {
        let current = self.view();
        let mut name = version_name(snapshot.created());
        if current.tree.version.0 == OsStr::new(&name) {
            name.push('1'); // two snapshots in the same nanosecond: keep the names distinct
        }
        let view = build(snapshot, &mut lock(&self.inodes), name, self.settings.owner)?;
        *lock(&self.pending) = Some(Arc::clone(&view));
        self.tmp_linked.store(false, Ordering::SeqCst);
        Ok(view)
    }

    pub fn unstage(&self) {
        lock(&self.pending).take();
        self.tmp_linked.store(false, Ordering::SeqCst);
    }

    /// Makes the pending view current. Called from the FUSE rename of `..data_tmp`.
    fn commit(&self) -> bool {
        let Some(next) = lock(&self.pending).take() else {
            return false;
        };
        self.tmp_linked.store(false, Ordering::SeqCst);
        let old = match self.current.write() {
            Ok(mut cur) => std::mem::replace(&mut *cur, next),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), next),
        };
        let mut retired = lock(&self.retired);
        retired.push_back(Retired {
            name: old.tree.version.0.clone(),
            data_link: old.tree.data_link,
            dirs: old.tree.dirs.iter().cloned().collect(),
            vdir: old.tree.version.1,
        });
        while retired.len() > RETIRED_GENERATIONS {
            retired.pop_front();
        }
        true
    }

    /// The target of a retired `..data` link.
    fn retired_link(&self, ino: u64) -> Option<OsString> {
        lock(&self.retired)
            .iter()
            .find(|r| r.data_link == ino)
            .map(|r| r.name.clone())
    }

    /// The path inside a version of a retired directory inode.
    fn retired_dir(&self, ino: u64) -> Option<String> {
        lock(&self.retired)
            .iter()
            .rev()
            .find_map(|r| r.dirs.get(&ino).cloned())
    }

    /// The current directory `ino` stands for: itself, or the current counterpart of a
    /// retired one.
    fn dir_for(&self, view: &View, ino: u64) -> Option<u64> {
        if view.tree.children(ino).is_some() {
            return Some(ino);
        }
        view.tree.dir_at(&self.retired_dir(ino)?)
    }

    /// Looks `name` up in directory `parent` of the current view, following retired
    /// directories and version names to the current version.
    fn lookup(&self, view: &View, parent: u64, name: &OsStr) -> Option<u64> {
        if let Some(ino) = view.tree.lookup(parent, name) {
            return Some(ino);
        }
        if parent == ROOT {
            return lock(&self.retired)
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.vdir);
        }
        view.tree.lookup(self.dir_for(view, parent)?, name)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The bytes of file `ino` in the current view.
    fn current_file(&self, ino: u64) -> Option<SecretBytes> {
        let view = self.view();
        match view.tree.node(ino)?.kind {
            Kind::File(i) => Some(view.snapshot.files().get(i)?.bytes.clone()),
            _ => None,
        }
    }

    /// The next file handle number; a successor process starts far above it, so that handles
    /// it hands out never equal ones still open from this process.
    pub fn next_handle(&self) -> u64 {
        self.next_fh.load(Ordering::Relaxed)
    }

    pub fn reader_binding(&self) -> bool {
        self.settings.pod_uid.is_some()
    }

    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// Attributes of `ino` in the current or the pending view.
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let view = self.view();
        view.attr(ino)
            .or_else(|| self.pending()?.attr(ino))
            .or_else(|| {
                let time = view.snapshot.created();
                self.retired_dir(ino)
                    .map(|_| file_attr(ino, FileType::Directory, DIR_MODE, 0, 2, time, &view.owner))
            })
    }
}

fn build(
    snapshot: Arc<Snapshot>,
    inodes: &mut Inodes,
    name: String,
    owner: Ownership,
) -> Result<Arc<View>, String> {
    let base = inodes.clone();
    let tree = Tree::build(&snapshot, &name, inodes)?;
    Ok(Arc::new(View {
        snapshot,
        tree,
        owner,
        base,
    }))
}

/// Whether the FUSE caller is a thread of this process (the driver itself).
fn from_driver(req: &Request) -> bool {
    Caller {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
    }
    .is_driver()
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
    let _ = lock(queue).send((notifier.clone(), ino));
}

pub struct VolumeFs(pub Arc<State>);

impl Filesystem for VolumeFs {
    /// Lets the kernel cache symlink targets: every symlink inode keeps its target for life
    /// (top-level names always point at `..data/<name>`, and each version gets a `..data`
    /// inode of its own), so an open through `name -> ..data/name -> ..<version>/name` costs
    /// no READLINK round trips. Targets are layout, never secret bytes. (A resumed session's
    /// synthetic INIT offers nothing; the kernel keeps what the first INIT agreed.)
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == DATA_TMP {
            let linked = self.0.tmp_linked.load(Ordering::SeqCst);
            return match self
                .0
                .pending()
                .filter(|_| linked)
                .and_then(|p| p.attr(p.tree.data_link))
            {
                Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let view = self.0.view();
        match self
            .0
            .lookup(&view, parent.0, name)
            .and_then(|ino| self.0.attr(ino))
        {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file reports the version it reads, even after a rotation.
        if let Some(h) = fh.and_then(|fh| self.0.handles.get(&fh.0)) {
            let owner = &self.0.settings.owner;
            let perm = owner.file_perm(h.mode);
            let attr = file_attr(
                h.ino,
                FileType::RegularFile,
                perm,
                h.bytes.len() as u64,
                1,
                h.time,
                owner,
            );
            return reply.attr(&TTL, &attr);
        }
        match self.0.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let view = self.0.view();
        let pending = self.0.pending();
        let node = view
            .tree
            .node(ino.0)
            .or_else(|| pending.as_ref()?.tree.node(ino.0));
        match node.map(|n| &n.kind) {
            Some(Kind::Symlink(target)) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            // A `..data` link replaced by a swap still points at its (retired) version.
            None => match self.0.retired_link(ino.0) {
                Some(target) => reply.data(target.as_bytes()),
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            // The driver signals a rotated file to inotify watchers with a write that changes
            // nothing (see `touch_changed`); nobody else may open for writing.
            let file = matches!(
                self.0.view().tree.node(ino.0).map(|n| &n.kind),
                Some(Kind::File(_))
            );
            if file && flags.acc_mode() == OpenAccMode::O_WRONLY && from_driver(req) {
                let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
                self.0.touches.insert(fh);
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            return reply.error(Errno::EROFS);
        }
        let view = self.0.view();
        let file = match view.tree.node(ino.0).map(|n| &n.kind) {
            Some(Kind::File(i)) => match view.snapshot.files().get(*i) {
                Some(f) => f,
                None => return reply.error(Errno::ENOENT),
            },
            Some(Kind::Dir(_)) => return reply.error(Errno::EISDIR),
            Some(Kind::Symlink(_)) => return reply.error(Errno::ELOOP),
            None => return reply.error(Errno::ENOENT),
        };
        let caller = Caller {
            pid: req.pid(),
            uid: req.uid(),
            gid: req.gid(),
        };
        // The driver's own opens (the audit report's page-cache probe, the demo) keep the page
        // cache as it is, so the probe can see what readers left; everyone else's open is
        // checked and audited.
        let driver = caller.is_driver();
        if !driver {
            let allowed = caller.allowed(&self.0.settings);
            let version = view.tree.version.0.to_string_lossy();
            self.0.audit.open(
                &self.0.settings,
                ino.0,
                &file.path,
                &version,
                &caller,
                allowed,
            );
            if !allowed {
                crate::metrics::get().binding_denied();
                return reply.error(Errno::EACCES);
            }
        }
        let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Handle {
            bytes: file.bytes.clone(),
            ino: ino.0,
            mode: file.mode,
            time: view.snapshot.created(),
        };
        self.0.handles.insert(fh, handle);
        // Direct I/O: every read comes to us and nothing is left in the page cache.
        let flags = if driver {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::FOPEN_DIRECT_IO
        };
        reply.opened(FileHandle(fh), flags);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // The kernel names the reading process's lock owner on every direct-I/O read; a read
        // without one fills the page cache (a private mmap faulting, or splice/sendfile, which
        // FUSE serves from the page cache even for direct-I/O files). Remember the handle so
        // that its release drops those pages.
        if lock_owner.is_none() {
            self.0.cached.insert(fh.0);
        }
        // A handle opened under the previous driver process reads the current version.
        let Some(bytes) = self
            .0
            .handles
            .get(&fh.0)
            .map(|h| h.bytes.clone())
            .or_else(|| self.0.current_file(ino.0))
        else {
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
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.touches.remove(&fh.0);
        self.0.handles.remove(&fh.0);
        // Pages a private mmap or sendfile pulled into the cache go once the handle (and with
        // it every mapping) is gone. Only such handles pay for it: the invalidation also drops
        // the inode's cached attributes, which costs the next open a GETATTR.
        if self.0.cached.remove(&fh.0).is_some()
            && let Some(n) = self.0.notifier.get()
        {
            invalidate_later(n, ino.0);
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
        let dir = self.0.dir_for(&view, ino.0).unwrap_or(ino.0);
        let (Some(children), Some(node)) = (view.tree.children(dir), view.tree.node(dir)) else {
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
                    Some(Kind::Symlink(_)) => FileType::Symlink,
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

    /// The first half of a swap: the driver creates `..data_tmp` (as kubelet's atomic writer
    /// does), which watchers see as IN_CREATE. Refused for anyone else.
    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        let pending = self.0.pending();
        match pending {
            Some(p) if parent.0 == ROOT && link_name == DATA_TMP && from_driver(req) => {
                match p.attr(p.tree.data_link) {
                    Some(attr) => {
                        self.0.tmp_linked.store(true, Ordering::SeqCst);
                        reply.entry(&TTL, &attr, Generation(0))
                    }
                    None => reply.error(Errno::EIO),
                }
            }
            _ => reply.error(Errno::EROFS),
        }
    }

    /// The second half: `..data_tmp` renamed over `..data` (IN_MOVED_FROM/IN_MOVED_TO)
    /// commits the pending version. Refused for anyone but the driver.
    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let swap = parent.0 == ROOT && newparent.0 == ROOT && name == DATA_TMP && newname == DATA;
        if swap && from_driver(req) && self.0.commit() {
            reply.ok();
        } else {
            reply.error(Errno::EROFS);
        }
    }

    // Everything else that would change the volume is refused.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    /// Only the driver's modify signal gets here; its bytes are discarded.
    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.0.touches.contains(&fh.0) && from_driver(req) {
            reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
        } else {
            reply.error(Errno::EROFS);
        }
    }

    fn mknod(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _: &Request, _: INodeNo, _: INodeNo, _: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _: &Request,
        _: INodeNo,
        _: &OsStr,
        _: u32,
        _: u32,
        _: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _: &Request,
        _: INodeNo,
        _: &OsStr,
        _: &[u8],
        _: i32,
        _: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret_mem::SnapshotBuilder;

    fn snapshot(files: &[(&str, u32, &[u8])]) -> Arc<Snapshot> {
        let mut b = SnapshotBuilder::new(64).expect("region");
        for (p, m, c) in files {
            b.add(p.to_string(), *m, c).expect("add");
        }
        Arc::new(b.finish(vec![]))
    }

    fn walk(view: &View, path: &str) -> Option<u64> {
        path.split('/')
            .try_fold(ROOT, |dir, name| view.tree.lookup(dir, OsStr::new(name)))
    }

    #[test]
    fn attributes_follow_the_snapshot() {
        let state = State::new(
            snapshot(&[("dir/f", 0o440, b"0123456789")]),
            Settings::default(),
        )
        .expect("state");
        let view = state.view();
        let root = view.attr(ROOT).expect("root");
        assert_eq!(
            (root.kind, root.perm, root.uid),
            (FileType::Directory, 0o755, 0)
        );
        let vdir = view.tree.version.0.to_string_lossy().into_owned();
        let f = walk(&view, &format!("{vdir}/dir/f")).expect("f");
        let attr = view.attr(f).expect("attr");
        assert_eq!(
            (attr.kind, attr.perm, attr.size, attr.gid),
            (FileType::RegularFile, 0o440, 10, 0)
        );
        let link = view.attr(walk(&view, "dir").expect("link")).expect("attr");
        assert_eq!(link.kind, FileType::Symlink);
        assert!(view.attr(4242).is_none());
    }

    #[test]
    fn staged_versions_become_current_only_on_commit() {
        let state =
            State::new(snapshot(&[("a", 0o644, b"one")]), Settings::default()).expect("state");
        let first = state.view();
        assert!(!state.commit(), "nothing staged");
        let staged = state
            .stage(snapshot(&[("a", 0o644, b"two!"), ("b", 0o600, b"new")]))
            .expect("stage");
        assert!(Arc::ptr_eq(&state.view(), &first));
        assert!(
            state.attr(staged.tree.data_link).is_some(),
            "pending inodes answer getattr"
        );
        assert!(state.commit());
        assert!(Arc::ptr_eq(&state.view(), &staged));
        assert_ne!(first.tree.version.0, staged.tree.version.0);
        // The file keeps its inode number and shows the new size.
        let vdir = staged.tree.version.0.to_string_lossy().into_owned();
        assert_eq!(
            walk(
                &first,
                &format!("{}/a", first.tree.version.0.to_string_lossy())
            ),
            walk(&staged, &format!("{vdir}/a"))
        );
        assert_eq!(
            state
                .attr(walk(&staged, &format!("{vdir}/a")).expect("a"))
                .map(|a| a.size),
            Some(4)
        );
    }
}
