//! Prometheus metrics and health endpoints, scraped over HTTP from a running driver.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Env, publish_request};

fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_publishes_errors_rotations_and_memory() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
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
        .node()
        .await
        .node_publish_volume(publish_request("vol-x", &env.target("pod-x"), "missing"))
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
