//! The audit report: per volume what is held, in which memory, who may read it, whether any
//! of it sits in the page cache; and the driver process's own posture.

use serde::{Deserialize, Serialize};

use crate::secret_mem::{MemoryKind, Region};
use crate::volume::Manager;

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub posture: Posture,
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Posture {
    pub pid: u32,
    /// memfd_secret, mlock, or unavailable (publishes fail).
    pub memory: String,
    /// Whether the process can be core-dumped or ptrace-attached by its own user.
    pub dumpable: bool,
    pub core_limit_bytes: u64,
    /// Memory the process has mlocked (bounce buffers, mlock-kind regions), in KiB.
    pub locked_kib: u64,
    /// memfd_secret mappings in the process (one per live snapshot).
    pub secretmem_regions: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Volume {
    pub volume_id: String,
    pub pod: String,
    pub target: String,
    pub class: String,
    pub provider: String,
    pub versions: Vec<String>,
    pub memory: String,
    pub memory_bytes: usize,
    pub reader_binding: bool,
    pub open_handles: usize,
    pub rotations: u64,
    pub last_error: Option<String>,
    pub files: Vec<File>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct File {
    pub path: String,
    pub mode: String,
    pub size: usize,
    /// Pages of this file in the page cache now (must be 0 unless a reader holds an mmap).
    pub cached_pages: Option<u64>,
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn posture() -> Posture {
    // SAFETY: reads process attributes only.
    let (dumpable, core) = unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_CORE, &mut lim);
        (
            libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0,
            lim.rlim_cur,
        )
    };
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    Posture {
        pid: std::process::id(),
        memory: Region::preferred_kind()
            .map_or("unavailable", MemoryKind::as_str)
            .into(),
        dumpable,
        core_limit_bytes: core,
        locked_kib: status_kib("VmLck:"),
        secretmem_regions: maps.lines().filter(|l| l.contains("secretmem")).count(),
    }
}

/// Page-cache pages of the file at `path`. The driver's own opens do not drop the cache (the
/// filesystem answers them with FOPEN_KEEP_CACHE), so this sees what readers left behind.
fn cached_pages(path: &std::path::Path) -> Option<u64> {
    let file = std::fs::File::open(path).ok()?;
    crate::fs::cached_pages(&file).ok()
}

/// Collects the report. Blocking (it opens every file to count its cached pages).
pub fn collect(manager: &Manager) -> Report {
    let volumes = manager
        .list()
        .into_iter()
        .map(|v| Volume {
            files: v
                .files
                .iter()
                .map(|(path, mode, size)| File {
                    path: path.clone(),
                    mode: format!("{mode:04o}"),
                    size: *size,
                    cached_pages: cached_pages(&v.target.join(path)),
                })
                .collect(),
            volume_id: v.volume_id,
            pod: format!("{}/{}", v.namespace, v.pod_name),
            target: v.target.display().to_string(),
            class: v.class,
            provider: v.provider,
            versions: v
                .versions
                .iter()
                .map(|(id, ver)| format!("{id}={ver}"))
                .collect(),
            memory: v.memory_kind.as_str().into(),
            memory_bytes: v.memory_bytes,
            reader_binding: v.reader_binding,
            open_handles: v.open_handles,
            rotations: v.rotations,
            last_error: v.last_error,
        })
        .collect();
    Report {
        posture: posture(),
        volumes,
    }
}

/// The report as a human-readable table.
pub fn render(report: &Report) -> String {
    let p = &report.posture;
    let mut out = format!(
        "driver pid {} · memory {} · dumpable {} · core limit {} · locked {} KiB · memfd_secret regions {}\n",
        p.pid,
        p.memory,
        if p.dumpable { "YES" } else { "no" },
        p.core_limit_bytes,
        p.locked_kib,
        p.secretmem_regions
    );
    if report.volumes.is_empty() {
        out.push_str("no volumes published\n");
    }
    for v in &report.volumes {
        out.push_str(&format!(
            "\nvolume {} · pod {} · class {} ({}) · {} bytes of {} · reader binding {} · open {} · rotations {}{}\n  target {}\n  versions {}\n",
            v.volume_id,
            v.pod,
            v.class,
            v.provider,
            v.memory_bytes,
            v.memory,
            if v.reader_binding { "on" } else { "off" },
            v.open_handles,
            v.rotations,
            v.last_error.as_ref().map(|e| format!(" · last refresh failed: {e}")).unwrap_or_default(),
            v.target,
            v.versions.join(", ")
        ));
        out.push_str(&format!(
            "  {:<6} {:>8} {:>12}  {}\n",
            "mode", "size", "cache pages", "file"
        ));
        for f in &v.files {
            let cached = f.cached_pages.map_or("?".to_string(), |c| c.to_string());
            out.push_str(&format!(
                "  {:<6} {:>8} {:>12}  {}\n",
                f.mode, f.size, cached, f.path
            ));
        }
    }
    out
}
