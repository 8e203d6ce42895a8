//! Cluster mode against a local API server (tests/common/kube_api.rs) with kube-rs as the real
//! client: classes from a watch-backed cache with a GET on a miss, the v1alpha1 fallback,
//! SecretProviderClassPodStatus objects through publish, rotation and unpublish, and
//! service-account tokens forwarded from either place kubelet puts them.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::kube_api::FakeApi;
use common::{Env, PROVIDER, publish_request};
use serde_json::Value;

const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
const STATUSES: &str = "secretproviderclasspodstatuses";

fn store(version: u32) -> String {
    format!(
        "version: \"{version}\"\nfiles:\n  - path: token\n    contents: \"cluster-secret-{version}\"\n"
    )
}

/// The driver and example provider, with classes and pod statuses from `api`.
async fn start(api: &FakeApi, extra: &[&str]) -> Option<Env> {
    let mut env = Env::new()?;
    let kubeconfig = env.root.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    env.write_secrets(&store(1));
    env.start_provider();
    let mut args = vec![format!("--kubeconfig={}", kubeconfig.display())];
    args.extend(extra.iter().map(|a| a.to_string()));
    env.start_driver(&args.iter().map(String::as_str).collect::<Vec<_>>());
    Some(env)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gets_of(api: &FakeApi, class: &str) -> usize {
    let path = format!("/{class}?");
    api.requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET ") && r.contains("/secretproviderclasses/") && r.contains(&path)
        })
        .count()
}

fn echo(target: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(target.join("request.json")).expect("read request.json"))
        .expect("request.json is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_from_the_api_cache_with_a_get_on_a_miss_and_pod_statuses() {
    let api = FakeApi::start(&["v1", "v1alpha1"]).await;
    api.put_class("default", "app", PROVIDER, &[("role", "reader")]);
    let Some(env) = start(&api, &["--rotation-interval=300ms"]).await else {
        return;
    };
    // The cache is filled once the watch that follows the initial list is open.
    wait_for("the class watch", || {
        api.requests()
            .iter()
            .any(|r| r.contains("/secretproviderclasses?") && r.contains("watch=true"))
    });

    let target = env.target("pod-k1");
    env.publish("vol-k1", &target).await.expect("publish");
    assert_eq!(
        std::fs::read_to_string(target.join("token")).expect("read"),
        "cluster-secret-1"
    );
    let attrs = &echo(&target)["attributes"];
    assert_eq!(
        attrs["role"], "reader",
        "class parameters reach the provider"
    );
    assert_eq!(gets_of(&api, "app"), 0, "a cached class costs no API call");

    // A class created after the cache stopped hearing (or just before its pod) is fetched.
    api.deliver_watch_events(false);
    api.put_class("default", "late", PROVIDER, &[("role", "late")]);
    let late = env.target("pod-k2");
    env.send_publish(publish_request("vol-k2", &late, "late"))
        .await
        .expect("publish with a class the cache has not seen");
    assert_eq!(echo(&late)["attributes"]["role"], "late");
    assert_eq!(gets_of(&api, "late"), 1);

    let missing = env
        .send_publish(publish_request("vol-k3", &env.target("pod-k3"), "nope"))
        .await
        .expect_err("unknown class");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("default/nope"), "{missing:?}");

    // One pod status per mounted pod volume, owned by the pod, versions only.
    let name = "default/web-0-default-app";
    wait_for("the pod status", || api.pod_statuses().contains_key(name));
    let status = &api.pod_statuses()[name];
    assert_eq!(
        status["metadata"]["labels"]["internal.secrets-store.csi.k8s.io/node-name"],
        "test-node"
    );
    let owner = &status["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["name"].as_str()),
        (Some("Pod"), Some("web-0"))
    );
    assert_eq!(owner["uid"], "0b3e7c7e-5d5e-4f3c-9a55-0c6f1f2d3a4b");
    assert_eq!(status["status"]["mounted"], true);
    assert_eq!(status["status"]["secretProviderClassName"], "app");
    assert_eq!(status["status"]["targetPath"], target.display().to_string());
    let objects = status["status"]["objects"].as_array().expect("objects");
    assert!(
        objects
            .iter()
            .any(|o| o["id"] == "token" && o["version"] == "1"),
        "{objects:?}"
    );
    assert!(
        !api.pod_statuses()
            .values()
            .any(|s| s.to_string().contains("cluster-secret")),
        "a pod status must never carry contents"
    );

    // Rotation updates the versions.
    env.write_secrets(&store(2));
    wait_for("the rotated version in the pod status", || {
        api.pod_statuses()
            .get(name)
            .is_some_and(|s| s["status"]["objects"].to_string().contains("\"2\""))
    });

    env.unpublish("vol-k1", &target).await.expect("unpublish");
    env.unpublish("vol-k2", &late).await.expect("unpublish");
    wait_for("the pod statuses to be deleted", || {
        api.pod_statuses().is_empty()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serving_only_v1alpha1_still_resolves_classes() {
    let api = FakeApi::start(&["v1alpha1"]).await;
    api.put_class("default", "app", PROVIDER, &[("role", "legacy")]);
    let Some(env) = start(&api, &["--write-pod-status=false"]).await else {
        return;
    };
    let target = env.target("pod-a1");
    env.publish("vol-a1", &target)
        .await
        .expect("publish via v1alpha1");
    assert_eq!(echo(&target)["attributes"]["role"], "legacy");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /apis/secrets-store.csi.x-k8s.io/v1alpha1/namespaces/default/secretproviderclasses/app")),
        "{:?}",
        api.requests()
    );
    env.unpublish("vol-a1", &target).await.expect("unpublish");
    assert!(
        !api.requests().iter().any(|r| r.contains(STATUSES)),
        "--write-pod-status=false writes no status"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_reach_the_provider_from_context_or_secrets() {
    let api = FakeApi::start(&["v1"]).await;
    api.put_class("default", "app", PROVIDER, &[]);
    let Some(env) = start(&api, &[]).await else {
        return;
    };
    let tokens =
        r#"{"vault":{"token":"eyJ.sa-token","expirationTimestamp":"2026-12-04T06:00:00Z"}}"#;

    // Kubelet's default: the tokens ride in the volume context.
    let in_context = env.target("pod-t1");
    let mut req = publish_request("vol-t1", &in_context, "app");
    req.volume_context.insert(TOKENS.into(), tokens.into());
    req.secrets.insert("clientid".into(), "abc".into());
    env.send_publish(req).await.expect("publish");
    let sent = echo(&in_context);
    assert_eq!(sent["attributes"][TOKENS], tokens);
    assert_eq!(
        sent["secrets"]["clientid"], "abc",
        "nodePublishSecretRef passes through"
    );

    // serviceAccountTokenInSecrets: true (Kubernetes ≥ 1.35) puts them in `secrets`; the
    // provider still finds them in the attributes, as from the upstream driver.
    let in_secrets = env.target("pod-t2");
    let mut req = publish_request("vol-t2", &in_secrets, "app");
    req.secrets.insert(TOKENS.into(), tokens.into());
    env.send_publish(req).await.expect("publish");
    let sent = echo(&in_secrets);
    assert_eq!(sent["attributes"][TOKENS], tokens);
    assert!(sent["secrets"].get(TOKENS).is_none(), "{sent}");
    assert_eq!(sent["secrets_raw"], "{}");

    env.unpublish("vol-t1", &in_context)
        .await
        .expect("unpublish");
    env.unpublish("vol-t2", &in_secrets)
        .await
        .expect("unpublish");
}
