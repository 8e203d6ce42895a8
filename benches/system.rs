//! System benchmark (figures, not pass/fail), run as root with /dev/fuse:
//!
//! `sudo cargo bench --bench system`
//!
//! 1. Publish/unpublish latency through the CSI socket with the example provider, and the
//!    driver's memory, threads and fds per mounted volume (SECRETFS_BENCH_VOLUMES volumes of
//!    10 files × 4 KiB, default 250).
//! 2. open + read 4 KiB + close per second on a secretfs file and on the same file on tmpfs
//!    (/dev/shm), with 1 and 2 reader threads.
//! 3. Rotation: driver CPU while SECRETFS_BENCH_ROTATION_VOLUMES volumes (default 100) are
//!    refreshed every second with unchanged versions, and the latency from a change in the
//!    store to the new contents being readable in every volume.
//! 4. Driver CPU while SECRETFS_BENCH_VOLUMES volumes are refreshed every 10 s, with
//!    unchanged versions and with every version changing (30 s each).
//!
//! Prints a table and writes target/bench/report.json.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::Env;

type Rows = Vec<(String, f64)>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / hz)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Sample {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
    fds: u64,
}

fn sample(pid: u32) -> Sample {
    Sample {
        rss_kib: proc_status(pid, "VmRSS:"),
        anon_kib: proc_status(pid, "RssAnon:"),
        file_kib: proc_status(pid, "RssFile:"),
        threads: proc_status(pid, "Threads:"),
        fds: fds(pid),
    }
}

fn store(version: u32) -> String {
    let file = base64::engine::general_purpose::STANDARD.encode(vec![0x5au8; 4096]);
    let mut yaml =
        format!("version: \"{version}\"\nfiles:\n  - path: version\n    contents: \"{version}\"\n");
    for i in 0..10 {
        yaml.push_str(&format!("  - path: dir/file-{i}\n    base64: {file}\n"));
    }
    yaml
}

async fn publish_phase(env: &Env, volumes: usize) -> Rows {
    let pid = env.driver_pid();
    let targets: Vec<_> = (0..volumes)
        .map(|i| env.target(&format!("pod-{i}")))
        .collect();
    // Warm up the connection paths once.
    env.publish("warmup", &env.target("warmup"))
        .await
        .expect("publish");
    env.unpublish("warmup", &env.target("warmup"))
        .await
        .expect("unpublish");
    let before = sample(pid);
    let mut node = env.node().await;
    let mut publish_ms = Vec::with_capacity(volumes);
    for (i, t) in targets.iter().enumerate() {
        let req = common::publish_request(&format!("vol-{i}"), t, "app");
        let start = Instant::now();
        node.node_publish_volume(req).await.expect("publish");
        publish_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    // First read of every volume (allocates the FUSE thread's bounce buffer).
    for t in &targets {
        std::fs::read(t.join("dir/file-0")).expect("read");
    }
    let after = sample(pid);
    let mut unpublish_ms = Vec::with_capacity(volumes);
    for (i, t) in targets.iter().enumerate() {
        let start = Instant::now();
        env.unpublish(&format!("vol-{i}"), t)
            .await
            .expect("unpublish");
        unpublish_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let end = sample(pid);
    publish_ms.sort_by(f64::total_cmp);
    unpublish_ms.sort_by(f64::total_cmp);
    let n = volumes as f64;
    let per = |a: u64, b: u64| (a as f64 - b as f64) / n;
    vec![
        (
            "publish latency p50 (ms)".into(),
            percentile(&publish_ms, 0.5),
        ),
        (
            "publish latency p99 (ms)".into(),
            percentile(&publish_ms, 0.99),
        ),
        (
            "unpublish latency p50 (ms)".into(),
            percentile(&unpublish_ms, 0.5),
        ),
        (
            "unpublish latency p99 (ms)".into(),
            percentile(&unpublish_ms, 0.99),
        ),
        (
            "driver RSS before (MiB)".into(),
            before.rss_kib as f64 / 1024.0,
        ),
        (
            "driver RSS with all mounted + read (MiB)".into(),
            after.rss_kib as f64 / 1024.0,
        ),
        (
            "RSS per mounted volume (KiB)".into(),
            per(after.rss_kib, before.rss_kib),
        ),
        (
            "  of which file-backed: secret data (KiB)".into(),
            per(after.file_kib, before.file_kib),
        ),
        (
            "  of which anonymous: stacks, buffers (KiB)".into(),
            per(after.anon_kib, before.anon_kib),
        ),
        (
            "threads per volume".into(),
            per(after.threads, before.threads),
        ),
        ("fds per volume".into(), per(after.fds, before.fds)),
        (
            "threads before / after unpublishing all".into(),
            before.threads as f64,
        ),
        ("  after".into(), end.threads as f64),
        (
            "fds before / after unpublishing all".into(),
            before.fds as f64,
        ),
        ("  after".into(), end.fds as f64),
        (
            "driver RSS after unpublishing all (MiB)".into(),
            end.rss_kib as f64 / 1024.0,
        ),
    ]
}

async fn rotation_phase(env: &Env, volumes: usize) -> Rows {
    let pid = env.driver_pid();
    let targets: Vec<_> = (0..volumes)
        .map(|i| env.target(&format!("rot-{i}")))
        .collect();
    for (i, t) in targets.iter().enumerate() {
        env.publish(&format!("rot-{i}"), t).await.expect("publish");
    }
    // Idle rotation: every volume refreshed each second, nothing changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = Duration::from_secs(10);
    let cpu0 = cpu_time(pid);
    tokio::time::sleep(window).await;
    let idle_cpu = (cpu_time(pid) - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;

    // A change in the store: time until every volume serves it.
    env.write_secrets(&store(2));
    let start = Instant::now();
    let mut seen_ms = vec![None; volumes];
    while seen_ms.iter().any(Option::is_none) && start.elapsed() < Duration::from_secs(10) {
        for (i, t) in targets.iter().enumerate() {
            if seen_ms[i].is_none()
                && std::fs::read_to_string(t.join("version")).is_ok_and(|v| v == "2")
            {
                seen_ms[i] = Some(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut latency: Vec<f64> = seen_ms.iter().map(|s| s.unwrap_or(f64::INFINITY)).collect();
    latency.sort_by(f64::total_cmp);
    for (i, t) in targets.iter().enumerate() {
        env.unpublish(&format!("rot-{i}"), t)
            .await
            .expect("unpublish");
    }
    vec![
        (
            format!("idle rotation CPU, {volumes} volumes @ 1 s (% of one core)"),
            idle_cpu,
        ),
        (
            "rotation latency p50, store change → readable (ms)".into(),
            percentile(&latency, 0.5),
        ),
        (
            "rotation latency max (ms)".into(),
            latency.last().copied().unwrap_or(0.0),
        ),
    ]
}

/// open + read 4 KiB + close per second on `path` with `threads` readers for `window`.
fn open_read_close_rate(path: &std::path::Path, threads: usize, window: Duration) -> f64 {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (path, stop) = (path.to_path_buf(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 4096];
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut f = std::fs::File::open(&path).expect("open");
                    f.read_exact(&mut buf).expect("read");
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(window);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().expect("reader")).sum();
    total as f64 / window.as_secs_f64()
}

async fn read_phase(env: &Env) -> Rows {
    let target = env.target("reader");
    env.publish("reader", &target).await.expect("publish");
    let secret = target.join("dir/file-0");
    let tmpfs = std::path::PathBuf::from(format!("/dev/shm/secretfs-bench-{}", std::process::id()));
    std::fs::write(&tmpfs, std::fs::read(&secret).expect("read")).expect("write tmpfs copy");
    let window = Duration::from_secs(3);
    let mut rows = Rows::new();
    for threads in [1, 2] {
        let ours = open_read_close_rate(&secret, threads, window);
        let theirs = open_read_close_rate(&tmpfs, threads, window);
        rows.push((
            format!("open+read 4 KiB+close /s, secretfs, {threads} reader(s)"),
            ours,
        ));
        rows.push((
            format!("open+read 4 KiB+close /s, tmpfs, {threads} reader(s)"),
            theirs,
        ));
        rows.push((
            format!("  ratio secretfs / tmpfs, {threads} reader(s)"),
            ours / theirs,
        ));
    }
    let _ = std::fs::remove_file(&tmpfs);
    env.unpublish("reader", &target).await.expect("unpublish");
    rows
}

/// Driver CPU while `volumes` volumes are refreshed every `interval`, over `window`; with
/// `changing`, the store gets a new version every second so every refresh rotates.
async fn rotation_cpu(env: &Env, volumes: usize, window: Duration, changing: bool) -> f64 {
    let pid = env.driver_pid();
    let targets: Vec<_> = (0..volumes)
        .map(|i| env.target(&format!("cpu-{i}")))
        .collect();
    for (i, t) in targets.iter().enumerate() {
        env.publish(&format!("cpu-{i}"), t).await.expect("publish");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = changing.then(|| {
        let (stop, secrets) = (std::sync::Arc::clone(&stop), env.secrets_file.clone());
        std::thread::spawn(move || {
            let mut v = 10;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                v += 1;
                let tmp = secrets.with_extension("tmp");
                std::fs::write(&tmp, store(v)).expect("write store");
                std::fs::rename(&tmp, &secrets).expect("rename store");
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    });
    let cpu0 = cpu_time(pid);
    tokio::time::sleep(window).await;
    let cpu = (cpu_time(pid) - cpu0).as_secs_f64() / window.as_secs_f64() * 100.0;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(w) = writer {
        w.join().expect("writer");
    }
    for (i, t) in targets.iter().enumerate() {
        env.unpublish(&format!("cpu-{i}"), t)
            .await
            .expect("unpublish");
    }
    cpu
}

fn main() {
    let volumes = env_usize("SECRETFS_BENCH_VOLUMES", 250);
    let rotation_volumes = env_usize("SECRETFS_BENCH_ROTATION_VOLUMES", 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Rows::new();
    {
        let Some(env) = Env::start_with(&store(1), &["--enable-secret-rotation=false"], false)
        else {
            return;
        };
        rows.extend(rt.block_on(publish_phase(&env, volumes)));
        rows.extend(rt.block_on(read_phase(&env)));
    }
    {
        let Some(env) = Env::start_with(&store(1), &["--rotation-interval", "1s"], false) else {
            return;
        };
        rows.extend(rt.block_on(rotation_phase(&env, rotation_volumes)));
    }
    for changing in [false, true] {
        let Some(env) = Env::start_with(&store(1), &["--rotation-interval", "10s"], false) else {
            return;
        };
        let cpu = rt.block_on(rotation_cpu(
            &env,
            volumes,
            Duration::from_secs(30),
            changing,
        ));
        let what = if changing {
            "every version changing"
        } else {
            "unchanged"
        };
        rows.push((
            format!("rotation CPU, {volumes} volumes × 10 files @ 10 s, {what} (%)"),
            cpu,
        ));
    }
    println!(
        "secretfs system benchmark — {volumes} volumes × 10 files × 4 KiB for publish; {rotation_volumes} volumes for rotation; example provider"
    );
    println!("{:<56} {:>10}", "metric", "value");
    for (name, value) in &rows {
        println!("{name:<56} {value:>10.2}");
    }
    let json = serde_json::json!({
        "publish_volumes": volumes,
        "rotation_volumes": rotation_volumes,
        "metrics": rows.iter().map(|(k, v)| serde_json::json!({"metric": k, "value": v})).collect::<Vec<_>>(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("mkdir target/bench");
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write report");
    println!("report: {}", dir.join("report.json").display());
}
