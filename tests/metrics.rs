//! Prometheus metrics and health endpoints, scraped over HTTP from a running driver.

mod common;

use std::time::{Duration, Instant};

use common::{Env, free_port, http_get as get, publish_request, sample};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_publishes_errors_rotations_and_memory() {
    let port = free_port();
    let addr = format!("--metrics-addr=127.0.0.1:{port}");
    let store = |v: u32| {
        format!("version: \"{v}\"\nfiles:\n  - path: token\n    contents: \"secret-value-{v}\"\n")
    };
    let Some(env) = Env::start_with(&store(1), &[&addr, "--rotation-interval", "300ms"], false)
    else {
        return;
    };
    assert_eq!(get(port, "/healthz").0, 200);
    assert_eq!(get(port, "/readyz").0, 200);
    assert_eq!(get(port, "/nope").0, 404);

    let target = env.target("pod-m");
    env.publish("vol-m", &target).await.expect("publish");
    env.publish("vol-m", &target).await.expect("republish");
    let err = env
        .send_publish(publish_request("vol-x", &env.target("pod-x"), "missing"))
        .await;
    assert!(err.is_err());
    env.write_secrets(&store(2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(target.join("token")).expect("read") != "secret-value-2" {
        assert!(Instant::now() < deadline, "no rotation");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (status, body) = get(port, "/metrics");
    assert_eq!(status, 200);
    let labels = "{provider=\"example\",os_type=\"linux\"}";
    assert_eq!(
        sample(&body, &format!("total_node_publish_total{labels}")),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "total_node_publish_error_total{provider=\"\",os_type=\"linux\",error_type=\"SecretProviderClassNotFound\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample(&body, &format!("total_rotation_reconcile_total{labels}")).is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            &format!("rotation_reconcile_duration_sec_count{labels}")
        )
        .is_some_and(|n| n >= 1.0)
    );
    assert!(
        sample(
            &body,
            &format!("node_publish_duration_seconds_count{labels}")
        )
        .is_some_and(|n| n >= 2.0)
    );
    assert!(
        sample(
            &body,
            &format!("provider_mount_duration_seconds_count{labels}")
        )
        .is_some_and(|n| n >= 2.0)
    );
    assert_eq!(sample(&body, "volumes_published "), Some(1.0), "{body}");
    assert!(
        sample(&body, "secret_memory_bytes{kind=\"memfd_secret\"}").is_some_and(|b| b >= 4096.0),
        "{body}"
    );

    env.unpublish("vol-m", &target).await.expect("unpublish");
    let (_, body) = get(port, "/metrics");
    assert_eq!(
        sample(&body, &format!("total_node_unpublish_total{labels}")),
        Some(1.0),
        "{body}"
    );
    assert_eq!(sample(&body, "volumes_published "), Some(0.0));
    let deadline = Instant::now() + Duration::from_secs(3);
    while sample(
        &get(port, "/metrics").1,
        "secret_memory_bytes{kind=\"memfd_secret\"}",
    ) != Some(0.0)
    {
        assert!(
            Instant::now() < deadline,
            "secret memory not released after unpublish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !body.contains("t1") && !body.contains("t2\n"),
        "metrics expose secret contents"
    );
}

/// The upstream driver's spellings: `--metrics-addr=:PORT`, `--log-format-json`, and provider
/// sockets found through `--additional-provider-volume-paths`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_flag_spellings_work() {
    let port = free_port();
    let Some(mut env) = Env::new() else {
        return;
    };
    env.write_secrets("files:\n  - path: token\n    contents: upstream\n");
    env.write_class("default", "app", common::PROVIDER, &[]);
    env.start_provider_with(false);
    let empty = env.root.join("no-providers");
    std::fs::create_dir(&empty).expect("mkdir");
    let metrics = format!("--metrics-addr=:{port}");
    let extra = format!(
        "--additional-provider-volume-paths={},{}",
        env.root.join("missing").display(),
        env.provider_dir.display()
    );
    let first = format!("--provider-dir={}", empty.display());
    env.start_driver(&[&metrics, "--log-format-json", &first, &extra]);
    assert_eq!(get(port, "/healthz").0, 200, "listening on every address");
    let target = env.target("pod-u");
    env.publish("vol-u", &target)
        .await
        .expect("provider found in an additional dir");
    assert_eq!(
        std::fs::read_to_string(target.join("token")).expect("read"),
        "upstream"
    );
    env.unpublish("vol-u", &target).await.expect("unpublish");
    let log = std::fs::read_to_string(env.root.join("driver.log")).expect("log");
    let first_line = log.lines().next().expect("a log line");
    let parsed: serde_json::Value = serde_json::from_str(first_line).expect("JSON log line");
    assert!(parsed.get("fields").is_some(), "{first_line}");
}
