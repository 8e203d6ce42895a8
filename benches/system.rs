//! System benchmark (figures, not pass/fail): publish/unpublish latency through the CSI socket
//! with the example provider, and the driver's memory, threads and fds per mounted volume.
//!
//! `sudo cargo bench --bench system` (root and /dev/fuse). SECRETFS_BENCH_VOLUMES sets the
//! number of volumes (default 250). Prints a table and writes target/bench/report.json.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use base64::Engine;
use common::Env;

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
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

fn main() {
    let volumes: usize = std::env::var("SECRETFS_BENCH_VOLUMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let file = base64::engine::general_purpose::STANDARD.encode(vec![0x5au8; 4096]);
    let mut yaml = String::from("files:\n");
    for i in 0..10 {
        yaml.push_str(&format!("  - path: dir/file-{i}\n    base64: {file}\n"));
    }
    let Some(env) = Env::start(&yaml) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pid = env.driver_pid();
    let targets: Vec<_> = (0..volumes)
        .map(|i| env.target(&format!("pod-{i}")))
        .collect();

    rt.block_on(async {
        // Warm up the connection paths once.
        env.publish("warmup", &env.target("warmup")).await.expect("publish");
        env.unpublish("warmup", &env.target("warmup")).await.expect("unpublish");
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
            env.unpublish(&format!("vol-{i}"), t).await.expect("unpublish");
            unpublish_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let end = sample(pid);
        publish_ms.sort_by(f64::total_cmp);
        unpublish_ms.sort_by(f64::total_cmp);

        let n = volumes as f64;
        let per_mount_kib = (after.rss_kib as f64 - before.rss_kib as f64) / n;
        let threads_per = (after.threads as f64 - before.threads as f64) / n;
        let fds_per = (after.fds as f64 - before.fds as f64) / n;
        println!("secretfs system benchmark — {volumes} volumes × 10 files × 4 KiB, example provider, one client");
        println!("{:<44} {:>12}", "metric", "value");
        let rows = [
            ("publish latency p50 (ms)", percentile(&publish_ms, 0.5)),
            ("publish latency p99 (ms)", percentile(&publish_ms, 0.99)),
            ("unpublish latency p50 (ms)", percentile(&unpublish_ms, 0.5)),
            ("unpublish latency p99 (ms)", percentile(&unpublish_ms, 0.99)),
            ("driver RSS before (MiB)", before.rss_kib as f64 / 1024.0),
            ("driver RSS with all mounted + read (MiB)", after.rss_kib as f64 / 1024.0),
            ("RSS per mounted volume (KiB)", per_mount_kib),
            ("  of which file-backed: secret data (KiB)", (after.file_kib as f64 - before.file_kib as f64) / n),
            ("  of which anonymous: stacks, buffers (KiB)", (after.anon_kib as f64 - before.anon_kib as f64) / n),
            ("threads per volume", threads_per),
            ("threads before publishing", before.threads as f64),
            ("fds per volume", fds_per),
            ("driver RSS after unpublishing all (MiB)", end.rss_kib as f64 / 1024.0),
            ("threads after unpublishing all", end.threads as f64),
            ("fds after unpublishing all", end.fds as f64),
        ];
        for (name, value) in rows {
            println!("{name:<44} {value:>12.2}");
        }
        let json = serde_json::json!({
            "volumes": volumes,
            "metrics": rows.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "baseline": {"threads": before.threads, "fds": before.fds},
        });
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        std::fs::create_dir_all(&dir).expect("mkdir target/bench");
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&json).expect("json")).expect("write report");
        println!("report: {}", dir.join("report.json").display());
    });
}
