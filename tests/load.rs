//! Load and faults: many concurrent publish/unpublish cycles and rotations while the provider
//! errors, hangs past the deadline, answers garbage, drops the connection mid-reply, returns
//! oversized or traversing responses, and restarts. Bounded to well under a minute.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Env, publish_request};
use tonic::Code;

const GOOD: &str = "version: \"1\"\nfiles:\n  - path: token\n    contents: good-1\n";

/// What sits on the provider socket.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Healthy,
    ErrorCode,
    Oversized,
    Traversal,
    Hang,
    Garbage,
    CloseMidReply,
    Restart,
}

const FAULTS: [Fault; 8] = [
    Fault::Healthy,
    Fault::ErrorCode,
    Fault::Oversized,
    Fault::Traversal,
    Fault::Hang,
    Fault::Garbage,
    Fault::CloseMidReply,
    Fault::Restart,
];

/// A fake provider in this process: accepts on the provider socket and misbehaves.
fn raw_provider(
    path: &std::path::Path,
    fault: Fault,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).expect("bind fake provider");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    match fault {
                        Fault::Garbage => {
                            let junk: Vec<u8> =
                                (0..512u32).map(|i| (i * 7919 % 251) as u8).collect();
                            let _ = s.write_all(&junk);
                        }
                        // An HTTP/2 SETTINGS frame header cut short, then the connection drops.
                        Fault::CloseMidReply => {
                            let _ = s.write_all(&[0, 0, 18, 4, 0, 0, 0]);
                        }
                        _ => held.push(s), // Hang: keep it open, say nothing.
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

fn count_dir(path: String) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn threads(pid: u32) -> usize {
    count_dir(format!("/proc/{pid}/task"))
}

/// The names and kernel wait channels of the process's threads, for a failure message.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .map(|e| {
            let read = |f: &str| {
                std::fs::read_to_string(e.path().join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            format!("{} ({})", read("comm"), read("wchan"))
        })
        .collect()
}

fn fds(pid: u32) -> usize {
    count_dir(format!("/proc/{pid}/fd"))
}

struct Faults {
    env: Mutex<Env>,
    /// What the provider serves when it is healthy.
    store: Mutex<String>,
    stop_raw: Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
}

impl Faults {
    fn new(env: Env, store: String) -> Faults {
        Faults {
            env: Mutex::new(env),
            store: Mutex::new(store),
            stop_raw: Mutex::new(None),
        }
    }

    fn set(&self, fault: Fault) {
        let mut env = self.env.lock().expect("env");
        if let Some((stop, t)) = self.stop_raw.lock().expect("raw").take() {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
        env.kill_provider();
        match fault {
            Fault::Hang | Fault::Garbage | Fault::CloseMidReply => {
                let stop = Arc::new(AtomicBool::new(false));
                let t = raw_provider(&env.provider_socket(), fault, Arc::clone(&stop));
                *self.stop_raw.lock().expect("raw") = Some((stop, t));
            }
            _ => {
                env.write_secrets(&match fault {
                    Fault::ErrorCode => "error: E_VAULT_SEALED\n".to_string(),
                    Fault::Oversized => format!(
                        "files:\n  - path: big\n    contents: \"{}\"\n",
                        "x".repeat(8192)
                    ),
                    Fault::Traversal => {
                        "files:\n  - path: ../../escape\n    contents: x\n".to_string()
                    }
                    _ => self.store.lock().expect("store").clone(),
                });
                env.start_provider_with(false);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_unpublish_cycles_under_provider_faults() {
    let port = common::free_port();
    let metrics = format!("--metrics-addr=127.0.0.1:{port}");
    let args = [
        "--provider-timeout",
        "1s",
        "--max-volume-bytes",
        "4096",
        "--enable-secret-rotation=false",
        &metrics,
    ];
    let Some(env) = Env::start_with(GOOD, &args, false) else {
        return;
    };
    let pid = env.driver_pid();
    let root = env.root.clone();
    let csi = env.csi_socket.clone();
    // Warm up, then take the baseline.
    let warm = env.target("warm");
    env.publish("warm", &warm).await.expect("warm publish");
    env.unpublish("warm", &warm).await.expect("warm unpublish");
    std::thread::sleep(Duration::from_millis(200));
    let (base_threads, base_fds) = (threads(pid), fds(pid));
    let targets: Vec<_> = (0..8).map(|i| env.target(&format!("client-{i}"))).collect();
    let faults = Arc::new(Faults::new(env, GOOD.to_string()));

    let done = Arc::new(AtomicUsize::new(0));
    let codes = Arc::new(Mutex::new(
        std::collections::BTreeMap::<String, usize>::new(),
    ));
    let started = Instant::now();
    let mut clients = Vec::new();
    for (i, target) in targets.iter().cloned().enumerate() {
        let (done, codes, csi) = (Arc::clone(&done), Arc::clone(&codes), csi.clone());
        clients.push(tokio::spawn(async move {
            let mut node = secretfs::proto::csi::node_client::NodeClient::new(
                secretfs::grpc_uds::connect(&csi).await.expect("connect"),
            );
            let mut n = 0;
            while done.fetch_add(1, Ordering::Relaxed) < 1000 {
                let id = format!("load-{i}-{n}");
                n += 1;
                match node
                    .node_publish_volume(publish_request(&id, &target, "app"))
                    .await
                {
                    Ok(_) => {
                        *codes.lock().expect("codes").entry("Ok".into()).or_default() += 1;
                        let text = std::fs::read_to_string(target.join("token"))
                            .expect("read published volume");
                        assert_eq!(text, "good-1", "a published volume served wrong contents");
                    }
                    Err(status) => {
                        assert!(
                            matches!(
                                status.code(),
                                Code::Unavailable
                                    | Code::DeadlineExceeded
                                    | Code::FailedPrecondition
                                    | Code::Internal
                            ),
                            "unclear status for a provider fault: {status:?}"
                        );
                        assert!(!status.message().is_empty());
                        *codes
                            .lock()
                            .expect("codes")
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                    }
                }
                node.node_unpublish_volume(secretfs::proto::csi::NodeUnpublishVolumeRequest {
                    volume_id: id,
                    target_path: target.display().to_string(),
                })
                .await
                .expect("unpublish never fails");
            }
        }));
    }
    // Cycle the faults while the clients run.
    let mut k = 0;
    while done.load(Ordering::Relaxed) < 1000 && started.elapsed() < Duration::from_secs(90) {
        let fault = FAULTS[k % FAULTS.len()];
        k += 1;
        let f = Arc::clone(&faults);
        tokio::task::spawn_blocking(move || f.set(fault))
            .await
            .expect("set fault");
        tokio::time::sleep(Duration::from_millis(if fault == Fault::Hang {
            400
        } else {
            250
        }))
        .await;
    }
    for c in clients {
        c.await.expect("client panicked");
    }
    let f = Arc::clone(&faults);
    tokio::task::spawn_blocking(move || f.set(Fault::Healthy))
        .await
        .expect("heal");
    let codes = codes.lock().expect("codes").clone();
    println!(
        "1000 cycles in {:.1} s with {k} fault switches: {codes:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        codes.get("Ok").copied().unwrap_or(0) > 100,
        "too few successes: {codes:?}"
    );
    assert!(codes.len() >= 4, "the faults did not show: {codes:?}");

    // Afterwards: nothing mounted, nothing held, the driver still answers.
    assert!(
        common::mounts_under(&root).is_empty(),
        "{:?}",
        common::mounts_under(&root)
    );
    for t in &targets {
        assert!(!t.exists(), "target left: {}", t.display());
    }
    let env = Arc::into_inner(faults)
        .expect("clients are done")
        .env
        .into_inner()
        .expect("env");
    let probe = env
        .identity()
        .await
        .probe(secretfs::proto::csi::ProbeRequest {})
        .await
        .expect("probe");
    assert_eq!(probe.into_inner().ready, Some(true));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (t, f) = (threads(pid), fds(pid));
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let regions = maps.lines().filter(|l| l.contains("secretmem")).count();
        let (_, body) = common::http_get(port, "/metrics");
        let held: f64 = body
            .lines()
            .filter(|l| l.starts_with("secret_memory_bytes{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if t <= base_threads + 1
            && f <= base_fds + 1
            && regions == 0
            && body.contains("secret_memory_bytes{")
            && held == 0.0
        {
            println!(
                "threads {t} (baseline {base_threads}), fds {f} (baseline {base_fds}), secret regions 0, secret-memory bytes 0"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resources not released: threads {t} (baseline {base_threads}): {:?}, fds {f} (baseline {base_fds}), regions {regions}, secret-memory bytes {held}",
            thread_names(pid)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Blocking-pool threads idle out after 10 s; the fake-provider threads are ours, not the driver's.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_faults_never_serves_empty_or_partial_volumes() {
    let store = |v: u32| {
        format!(
            "version: \"{v}\"\nfiles:\n  - path: a\n    contents: a-{v}\n  - path: b/c\n    contents: c-{v}\n"
        )
    };
    let args = [
        "--provider-timeout",
        "1s",
        "--max-volume-bytes",
        "4096",
        "--rotation-interval",
        "200ms",
    ];
    let Some(env) = Env::start_with(&store(1), &args, false) else {
        return;
    };
    let targets: Vec<_> = (0..6).map(|i| env.target(&format!("rot-{i}"))).collect();
    for (i, t) in targets.iter().enumerate() {
        env.publish(&format!("rot-{i}"), t).await.expect("publish");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = targets
        .iter()
        .cloned()
        .map(|t| {
            let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let a = std::fs::read_to_string(t.join("a"))
                        .expect("a missing: volume served empty");
                    let c = std::fs::read_to_string(t.join("b/c"))
                        .expect("b/c missing: volume served partial");
                    let va: u32 = a
                        .strip_prefix("a-")
                        .and_then(|v| v.parse().ok())
                        .expect("torn a");
                    let vc: u32 = c
                        .strip_prefix("c-")
                        .and_then(|v| v.parse().ok())
                        .expect("torn c");
                    assert!(va >= 1 && vc >= 1);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let faults = Faults::new(env, store(1));
    let mut version = 1;
    for round in 0..2 {
        for fault in FAULTS {
            if fault == Fault::Healthy {
                version += 1;
                *faults.store.lock().expect("store") = store(version);
            }
            faults.set(fault);
            std::thread::sleep(Duration::from_millis(if round == 0 { 500 } else { 300 }));
        }
    }
    faults.set(Fault::Healthy);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join()
            .expect("a reader saw an empty, partial or torn volume");
    }
    println!(
        "{} volume reads under faults",
        reads.load(Ordering::Relaxed)
    );
    for t in &targets {
        assert_eq!(
            std::fs::read_to_string(t.join("a")).expect("a"),
            format!("a-{version}"),
            "no recovery after faults"
        );
    }
    let env = faults.env.into_inner().expect("env");
    for (i, t) in targets.iter().enumerate() {
        env.unpublish(&format!("rot-{i}"), t)
            .await
            .expect("unpublish");
    }
}
