//! The layout one snapshot is served in, the one kubelet's atomic writer produces:
//!
//! ```text
//! /                       root (inode 1)
//! ├── password -> ..data/password      one symlink per top-level name
//! ├── db -> ..data/db
//! ├── ..data -> ..2026_12_03_19_45_01.123456789
//! └── ..2026_12_03_19_45_01.123456789/ the version directory: the provider's paths
//!     ├── password
//!     └── db/user
//! ```
//!
//! A rotation builds a new tree with a new version directory and swaps `..data`. Inode numbers
//! of files and top-level symlinks are stable across versions (keyed by path), so a file a
//! container bind-mounted through `subPath` serves the new contents after a rotation.
//! Directories and the `..data` link get fresh inodes per version.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};

use crate::secret_mem::Snapshot;

pub const ROOT: u64 = 1;
pub const DATA: &str = "..data";
pub const DATA_TMP: &str = "..data_tmp";

pub enum Kind {
    Dir(BTreeMap<OsString, u64>),
    /// Index into the snapshot's files.
    File(usize),
    Symlink(OsString),
}

pub struct Node {
    pub parent: u64,
    pub kind: Kind,
}

/// Hands out inode numbers for one mount: stable ones for file paths and top-level names,
/// fresh ones for everything else. Not secret: handed to a successor process so that it
/// rebuilds the same tree with the same numbers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Inodes {
    next: u64,
    files: HashMap<String, u64>,
    links: HashMap<String, u64>,
}

impl Default for Inodes {
    fn default() -> Self {
        Inodes {
            next: ROOT + 1,
            files: HashMap::new(),
            links: HashMap::new(),
        }
    }
}

impl Inodes {
    fn fresh(&mut self) -> u64 {
        let ino = self.next;
        self.next += 1;
        ino
    }

    fn stable(map: &mut HashMap<String, u64>, next: &mut u64, key: &str) -> u64 {
        *map.entry(key.to_string()).or_insert_with(|| {
            let ino = *next;
            *next += 1;
            ino
        })
    }
}

pub struct Tree {
    nodes: HashMap<u64, Node>,
    /// Name and inode of the version directory.
    pub version: (OsString, u64),
    /// Inode of the `..data` symlink (of `..data_tmp` while this tree is being swapped in).
    pub data_link: u64,
    /// Inode of each provider path, for invalidating cached attributes on a swap.
    pub files: Vec<u64>,
    /// Every directory of the version (the version directory itself as ""), with its path.
    pub dirs: Vec<(u64, String)>,
    /// Top-level names and their symlink inodes.
    pub top: BTreeMap<OsString, u64>,
}

impl Tree {
    /// Builds the tree of a snapshot whose paths passed `provider::validate::check_paths`;
    /// returns the offending path if they did not.
    pub fn build(snapshot: &Snapshot, version: &str, inodes: &mut Inodes) -> Result<Tree, String> {
        let version_ino = inodes.fresh();
        let data_link = inodes.fresh();
        let mut tree = Tree {
            nodes: HashMap::new(),
            version: (OsString::from(version), version_ino),
            data_link,
            files: Vec::new(),
            dirs: vec![(version_ino, String::new())],
            top: BTreeMap::new(),
        };
        tree.nodes.insert(
            version_ino,
            Node {
                parent: ROOT,
                kind: Kind::Dir(BTreeMap::new()),
            },
        );
        tree.nodes.insert(
            data_link,
            Node {
                parent: ROOT,
                kind: Kind::Symlink(version.into()),
            },
        );
        for (index, file) in snapshot.files().iter().enumerate() {
            let mut dir = version_ino;
            let mut prefix = String::new();
            let mut segments = file.path.split('/').peekable();
            while let Some(name) = segments.next() {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(name);
                let last = segments.peek().is_none();
                let existing = tree
                    .children(dir)
                    .and_then(|c| c.get(OsStr::new(name)))
                    .copied();
                dir = match (existing, last) {
                    (None, true) => {
                        let ino = Inodes::stable(&mut inodes.files, &mut inodes.next, &file.path);
                        tree.files.push(ino);
                        tree.add(dir, name, ino, Kind::File(index))
                    }
                    (None, false) => {
                        let ino = inodes.fresh();
                        tree.dirs.push((ino, prefix.clone()));
                        tree.add(dir, name, ino, Kind::Dir(BTreeMap::new()))
                    }
                    (Some(ino), false) if tree.children(ino).is_some() => ino,
                    _ => return Err(file.path.clone()),
                };
            }
        }
        let names: Vec<OsString> = tree
            .children(version_ino)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let key = name.to_string_lossy().into_owned();
            let ino = Inodes::stable(&mut inodes.links, &mut inodes.next, &key);
            let mut target = OsString::from(format!("{DATA}/"));
            target.push(&name);
            tree.nodes.insert(
                ino,
                Node {
                    parent: ROOT,
                    kind: Kind::Symlink(target),
                },
            );
            tree.top.insert(name, ino);
        }
        let mut root = tree.top.clone();
        root.insert(DATA.into(), data_link);
        root.insert(tree.version.0.clone(), version_ino);
        tree.nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                kind: Kind::Dir(root),
            },
        );
        Ok(tree)
    }

    fn add(&mut self, parent: u64, name: &str, ino: u64, kind: Kind) -> u64 {
        self.nodes.insert(ino, Node { parent, kind });
        if let Some(Node {
            kind: Kind::Dir(children),
            ..
        }) = self.nodes.get_mut(&parent)
        {
            children.insert(OsString::from(name), ino);
        }
        ino
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn children(&self, ino: u64) -> Option<&BTreeMap<OsString, u64>> {
        match self.node(ino)?.kind {
            Kind::Dir(ref children) => Some(children),
            _ => None,
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.children(parent)?.get(name).copied()
    }

    /// The directory at `path` inside the version directory ("" is the version directory).
    pub fn dir_at(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|s| !s.is_empty())
            .try_fold(self.version.1, |dir, name| {
                self.lookup(dir, OsStr::new(name))
            })
            .filter(|ino| self.children(*ino).is_some())
    }

    #[allow(clippy::len_without_is_empty)] // never empty: the root is always there
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

/// `..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN` (UTC), the version directory name kubelet's atomic writer
/// uses.
pub fn version_name(time: std::time::SystemTime) -> String {
    let rfc = humantime::format_rfc3339_nanos(time).to_string(); // 2026-12-03T19:45:01.123456789Z
    let body: String = rfc
        .trim_end_matches('Z')
        .chars()
        .map(|c| if matches!(c, '-' | ':' | 'T') { '_' } else { c })
        .collect();
    format!("..{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret_mem::SnapshotBuilder;

    fn snapshot(paths: &[&str]) -> Snapshot {
        let mut b = SnapshotBuilder::new(64).expect("region");
        for p in paths {
            b.add(p.to_string(), 0o644, b"x").expect("add");
        }
        b.finish(vec![])
    }

    fn walk(tree: &Tree, path: &str) -> Option<u64> {
        path.split('/')
            .try_fold(ROOT, |dir, name| tree.lookup(dir, OsStr::new(name)))
    }

    #[test]
    fn layout_matches_kubelets_atomic_writer() {
        let mut inodes = Inodes::default();
        let tree =
            Tree::build(&snapshot(&["a", "d/b", "d/e/c"]), "..v1", &mut inodes).expect("tree");
        let root: Vec<_> = tree.children(ROOT).expect("root").keys().cloned().collect();
        assert_eq!(root, ["..data", "..v1", "a", "d"]);
        let link = |name: &str| match tree.node(walk(&tree, name).expect(name)).map(|n| &n.kind) {
            Some(Kind::Symlink(t)) => t.to_string_lossy().into_owned(),
            _ => panic!("{name} is not a symlink"),
        };
        assert_eq!(link("..data"), "..v1");
        assert_eq!(link("a"), "..data/a");
        assert_eq!(link("d"), "..data/d");
        let c = walk(&tree, "..v1/d/e/c").expect("c");
        assert!(matches!(tree.node(c).map(|n| &n.kind), Some(Kind::File(2))));
        assert_eq!(tree.files.len(), 3);
        let dirs: Vec<&str> = tree.dirs.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(dirs, ["", "d", "d/e"]);
        assert_eq!(tree.dir_at("d/e"), walk(&tree, "..v1/d/e"));
        assert_eq!(tree.dir_at(""), Some(tree.version.1));
        assert_eq!(tree.dir_at("a"), None, "a file is not a directory");
    }

    #[test]
    fn file_and_link_inodes_are_stable_across_versions() {
        let mut inodes = Inodes::default();
        let v1 = Tree::build(&snapshot(&["a", "d/b"]), "..v1", &mut inodes).expect("v1");
        let v2 = Tree::build(&snapshot(&["d/b", "a", "new"]), "..v2", &mut inodes).expect("v2");
        assert_eq!(walk(&v1, "..v1/a"), walk(&v2, "..v2/a"));
        assert_eq!(walk(&v1, "..v1/d/b"), walk(&v2, "..v2/d/b"));
        assert_eq!(walk(&v1, "d"), walk(&v2, "d"));
        assert_ne!(
            walk(&v1, "..v1/d"),
            walk(&v2, "..v2/d"),
            "directories are per version"
        );
        assert_ne!(v1.data_link, v2.data_link);
        assert_ne!(v1.version.1, v2.version.1);
        let new = walk(&v2, "..v2/new").expect("new");
        assert!(v1.node(new).is_none());
    }

    #[test]
    fn file_dir_conflicts_are_refused() {
        let mut inodes = Inodes::default();
        assert!(Tree::build(&snapshot(&["a", "a/b"]), "..v", &mut inodes).is_err());
        assert!(Tree::build(&snapshot(&["a/b", "a"]), "..v", &mut inodes).is_err());
        assert!(Tree::build(&snapshot(&["a", "a"]), "..v", &mut inodes).is_err());
    }

    #[test]
    fn version_names_look_like_kubelets() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_796_327_101, 123_456_789);
        assert_eq!(version_name(t), "..2026_12_03_19_45_01.123456789");
    }
}
