use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use super::{ClassSource, Error, Lookup, SecretProviderClass, parse_documents};

/// Standalone mode: classes from `*.yaml`/`*.yml` files in one directory. The directory is
/// rescanned on every lookup (a file is re-parsed only when its mtime or size changed), so
/// edits take effect without a restart.
pub struct DirSource {
    dir: PathBuf,
    cache: Mutex<HashMap<PathBuf, CachedFile>>,
}

struct CachedFile {
    stamp: (SystemTime, u64),
    parsed: Result<Vec<SecretProviderClass>, String>,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirSource {
            dir: dir.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Synchronous lookup; scans the directory.
    pub fn find(&self, namespace: &str, name: &str) -> Result<SecretProviderClass, Error> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::Unavailable(format!("class dir {}: {e}", self.dir.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::Unavailable("class cache lock poisoned".into()))?;
        cache.retain(|path, _| files.contains(path));
        let mut broken = Vec::new();
        let mut found = None;
        for path in &files {
            let entry = refresh(&mut cache, path);
            match &entry.parsed {
                Ok(classes) => {
                    if found.is_none() {
                        found = classes
                            .iter()
                            .find(|c| c.namespace == namespace && c.name == name)
                            .cloned();
                    }
                }
                Err(e) => broken.push(format!("{}: {e}", path.display())),
            }
        }
        found.ok_or_else(|| Error::NotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
            hint: if broken.is_empty() {
                String::new()
            } else {
                format!("; unreadable class files: {}", broken.join("; "))
            },
        })
    }
}

fn refresh<'a>(cache: &'a mut HashMap<PathBuf, CachedFile>, path: &Path) -> &'a CachedFile {
    let stamp = std::fs::metadata(path)
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        .unwrap_or((SystemTime::UNIX_EPOCH, 0));
    let stale = cache.get(path).is_none_or(|c| c.stamp != stamp);
    if stale {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| parse_documents(&text).map_err(|e| e.to_string()));
        cache.insert(path.to_path_buf(), CachedFile { stamp, parsed });
    }
    // Just inserted or present.
    &cache[path]
}

impl ClassSource for DirSource {
    fn lookup<'a>(&'a self, namespace: &'a str, name: &'a str) -> Lookup<'a> {
        // A scan stats a handful of small files: cheap enough to run inline.
        Box::pin(async move { self.find(namespace, name) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, provider: &str) -> String {
        format!(
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{provider: {provider}}}\n"
        )
    }

    #[test]
    fn picks_up_new_changed_and_removed_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = DirSource::new(dir.path());
        assert!(matches!(src.find("ns", "a"), Err(Error::NotFound { .. })));

        let file = dir.path().join("a.yaml");
        std::fs::write(&file, class("a", "one")).expect("write");
        assert_eq!(src.find("ns", "a").expect("found").provider, "one");
        assert!(matches!(
            src.find("other", "a"),
            Err(Error::NotFound { .. })
        ));

        // A rewrite with a different size is noticed even within the mtime granularity.
        std::fs::write(&file, class("a", "second")).expect("write");
        assert_eq!(src.find("ns", "a").expect("found").provider, "second");

        std::fs::write(dir.path().join("notes.txt"), class("b", "x")).expect("write");
        assert!(src.find("ns", "b").is_err(), "non-yaml files are ignored");

        std::fs::write(dir.path().join("broken.yml"), "kind: [").expect("write");
        let err = src.find("ns", "zzz").expect_err("missing").to_string();
        assert!(err.contains("broken.yml"), "{err}");
        assert_eq!(src.find("ns", "a").expect("still found").provider, "second");

        std::fs::remove_file(&file).expect("rm");
        assert!(matches!(src.find("ns", "a"), Err(Error::NotFound { .. })));
    }
}
