//! The directory tree of one snapshot: inode numbers, names and parents. Directories are
//! implied by the files' paths.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

use crate::secret_mem::Snapshot;

pub const ROOT: u64 = 1;

pub enum Kind {
    Dir(BTreeMap<OsString, u64>),
    /// Index into the snapshot's files.
    File(usize),
}

pub struct Node {
    pub parent: u64,
    pub kind: Kind,
}

pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Builds the tree of a snapshot whose paths passed `provider::validate::check_paths`;
    /// returns the offending path if they did not.
    pub fn build(snapshot: &Snapshot) -> Result<Tree, String> {
        let mut tree = Tree {
            nodes: vec![Node {
                parent: ROOT,
                kind: Kind::Dir(BTreeMap::new()),
            }],
        };
        for (index, file) in snapshot.files().iter().enumerate() {
            let mut dir = ROOT;
            let mut segments = file.path.split('/').peekable();
            while let Some(name) = segments.next() {
                let last = segments.peek().is_none();
                let existing = tree
                    .children(dir)
                    .and_then(|c| c.get(OsStr::new(name)))
                    .copied();
                dir = match (existing, last) {
                    (None, _) => tree.add(
                        dir,
                        name,
                        if last {
                            Kind::File(index)
                        } else {
                            Kind::Dir(BTreeMap::new())
                        },
                    ),
                    (Some(ino), false) if tree.children(ino).is_some() => ino,
                    _ => return Err(file.path.clone()),
                };
            }
        }
        Ok(tree)
    }

    fn add(&mut self, parent: u64, name: &str, kind: Kind) -> u64 {
        self.nodes.push(Node { parent, kind });
        let ino = self.nodes.len() as u64;
        if let Some(Node {
            kind: Kind::Dir(children),
            ..
        }) = self.node_mut(parent)
        {
            children.insert(OsString::from(name), ino);
        }
        ino
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        usize::try_from(ino.checked_sub(1)?)
            .ok()
            .and_then(|i| self.nodes.get(i))
    }

    fn node_mut(&mut self, ino: u64) -> Option<&mut Node> {
        usize::try_from(ino.checked_sub(1)?)
            .ok()
            .and_then(|i| self.nodes.get_mut(i))
    }

    pub fn children(&self, ino: u64) -> Option<&BTreeMap<OsString, u64>> {
        match self.node(ino)?.kind {
            Kind::Dir(ref children) => Some(children),
            Kind::File(_) => None,
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.children(parent)?.get(name).copied()
    }

    #[allow(clippy::len_without_is_empty)] // never empty: the root is always there
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
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

    #[test]
    fn nested_paths_make_directories() {
        let tree = Tree::build(&snapshot(&["a", "d/b", "d/e/c"])).expect("tree");
        assert_eq!(tree.len(), 6); // root, a, d, b, e, c
        let d = tree.lookup(ROOT, OsStr::new("d")).expect("d");
        let e = tree.lookup(d, OsStr::new("e")).expect("e");
        let c = tree.lookup(e, OsStr::new("c")).expect("c");
        assert!(matches!(tree.node(c).map(|n| &n.kind), Some(Kind::File(2))));
        assert_eq!(tree.node(c).map(|n| n.parent), Some(e));
        assert!(tree.children(c).is_none());
        assert!(tree.node(0).is_none() && tree.node(99).is_none());
    }

    #[test]
    fn file_dir_conflicts_are_refused() {
        assert!(Tree::build(&snapshot(&["a", "a/b"])).is_err());
        assert!(Tree::build(&snapshot(&["a/b", "a"])).is_err());
        assert!(Tree::build(&snapshot(&["a", "a"])).is_err());
    }
}
