//! `secretfs doctor`: can this host run the driver safely?

use serde::Serialize;

use crate::secret_mem::{MemoryKind, Region};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// How to fix it; empty when nothing needs fixing.
    pub fix: String,
}

fn check(
    name: &'static str,
    level: Level,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: if level == Level::Ok {
            String::new()
        } else {
            fix.into()
        },
    }
}

fn cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find(|l| l.starts_with("CapEff:"))?
                .split_whitespace()
                .nth(1)?
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs every check. Blocking.
pub fn run() -> Vec<Check> {
    let mut checks = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    checks.push(check(
        "root",
        if root { Level::Ok } else { Level::Fail },
        if root {
            "running as root"
        } else {
            "not root: mount(2) of FUSE needs root"
        },
        "run the driver as root (privileged DaemonSet container)",
    ));
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse");
    checks.push(check(
        "/dev/fuse",
        if fuse.is_ok() { Level::Ok } else { Level::Fail },
        match &fuse {
            Ok(_) => "present and openable".to_string(),
            Err(e) => format!("cannot open: {e}"),
        },
        "modprobe fuse; in a container, mount the host's /dev/fuse",
    ));
    let release = kernel_release();
    checks.push(check("kernel", Level::Ok, release.clone(), ""));
    let secretmem = Region::with_kind(1, MemoryKind::SecretMem);
    checks.push(check(
        "memfd_secret",
        if secretmem.is_ok() { Level::Ok } else { Level::Warn },
        match &secretmem {
            Ok(_) => "available: secrets live in memory even root cannot read via /proc/PID/mem".to_string(),
            Err(e) => format!("unavailable ({e}); secrets fall back to mlocked memory, readable by root"),
        },
        "boot a kernel >= 5.14 with CONFIG_SECRETMEM=y (and secretmem.enable=1 before 6.5); allow syscall 447 in seccomp",
    ));
    let mut memlock = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes into the struct above.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut memlock) };
    let ipc_lock = cap_ipc_lock();
    let locked = Region::with_kind(1, MemoryKind::Locked);
    let limit = if memlock.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        format!("{} KiB", memlock.rlim_cur / 1024)
    };
    checks.push(check(
        "mlock",
        match (&locked, ipc_lock) {
            (Err(_), _) => {
                if secretmem.is_ok() { Level::Warn } else { Level::Fail }
            }
            (Ok(_), true) => Level::Ok,
            (Ok(_), false) => Level::Warn,
        },
        format!(
            "{}; RLIMIT_MEMLOCK {limit}; CAP_IPC_LOCK {}",
            if locked.is_ok() { "works" } else { "fails" },
            if ipc_lock { "yes" } else { "no" }
        ),
        "grant CAP_IPC_LOCK (memfd_secret and the read bounce buffers count against RLIMIT_MEMLOCK without it)",
    ));
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    let swap_devices = swaps
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    checks.push(check(
        "swap",
        Level::Ok,
        if swap_devices == 0 {
            "off".to_string()
        } else {
            format!(
                "{swap_devices} device(s) on; secret memory is never swapped (memfd_secret / mlock)"
            )
        },
        "",
    ));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v2 = mounts
        .lines()
        .any(|l| l.split(' ').nth(2) == Some("cgroup2"));
    let v1 = mounts
        .lines()
        .any(|l| l.split(' ').nth(2) == Some("cgroup"));
    let pods = [
        "/sys/fs/cgroup/kubepods",
        "/sys/fs/cgroup/kubepods.slice",
        "/sys/fs/cgroup/unified/kubepods",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    checks.push(check(
        "cgroups",
        if v1 || v2 { Level::Ok } else { Level::Warn },
        format!(
            "{}{}; kubepods cgroups {}visible (reader binding reads /proc/PID/cgroup of each reader)",
            if v2 { "cgroup v2" } else { "" },
            if v1 { if v2 { " + v1" } else { "cgroup v1" } } else { "" },
            if pods { "" } else { "not " }
        ),
        "mount cgroupfs; reader binding cannot place readers in pods without it",
    ));
    let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
    checks.push(check(
        "core dumps",
        Level::Ok,
        format!(
            "driver disables its own (PR_SET_DUMPABLE 0, RLIMIT_CORE 0; memory is MADV_DONTDUMP); host core_pattern {:?}",
            core_pattern.trim()
        ),
        "",
    ));
    checks
}

/// Whether the driver could run safely: no check failed.
pub fn healthy(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.level != Level::Fail)
}

pub fn render(checks: &[Check]) -> String {
    let mut out = format!("{:<13} {:<5} {}\n", "CHECK", "", "DETAIL");
    for c in checks {
        let level = match c.level {
            Level::Ok => "ok",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        out.push_str(&format!("{:<13} {:<5} {}\n", c.name, level, c.detail));
        if !c.fix.is_empty() {
            out.push_str(&format!("{:<13} {:<5} fix: {}\n", "", "", c.fix));
        }
    }
    out.push_str(if healthy(checks) {
        "\nthe driver can run safely on this host\n"
    } else {
        "\nthe driver cannot run safely on this host: fix the FAIL lines\n"
    });
    out
}
