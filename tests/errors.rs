//! Bad requests, missing classes, and providers that are down or misbehave: each gets the
//! right gRPC status with a message naming the problem, and leaves nothing mounted or created.

mod common;

use std::path::Path;

use common::{Env, publish_request};
use secretfs::proto::csi::volume_capability::{AccessType, BlockVolume};
use secretfs::proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetCapabilitiesRequest,
    NodeGetInfoRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, ProbeRequest, VolumeCapability,
};
use tonic::Code;

const SECRETS: &str = "files:\n  - path: token\n    contents: abc\n";

/// Asserts a failed publish left no mount, no target directory and no registry entry (the
/// same target then publishes fine if `retry` is set).
fn assert_nothing_left(env: &Env, target: &Path) {
    assert!(
        env.mounts().is_empty(),
        "mount left behind: {:?}",
        env.mounts()
    );
    assert!(
        !target.exists(),
        "target dir {} left behind",
        target.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_name_the_field_and_change_nothing() {
    let Some(env) = Env::start(SECRETS) else {
        return;
    };
    let target = env.target("pod-bad");
    type Mutate = fn(&mut NodePublishVolumeRequest);
    let cases: Vec<(Mutate, &str)> = vec![
        (|r| r.volume_id.clear(), "volume_id"),
        (|r| r.target_path.clear(), "target_path"),
        (|r| r.target_path = "relative/mount".into(), "target_path"),
        (|r| r.volume_capability = None, "volume_capability"),
        (
            |r| {
                r.volume_capability = Some(VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    access_mode: None,
                })
            },
            "volume_capability.block",
        ),
        (|r| r.readonly = false, "readonly"),
        (
            |r| {
                r.volume_context.remove("secretProviderClass");
            },
            "secretProviderClass",
        ),
    ];
    let mut node = env.node().await;
    for (mutate, field) in cases {
        let mut req = publish_request("vol-bad", &target, "app");
        mutate(&mut req);
        let err = node.node_publish_volume(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "{field} not named in {:?}",
            err.message()
        );
        assert_nothing_left(&env, &target);
    }
    for (req, field) in [
        (
            NodeUnpublishVolumeRequest {
                volume_id: String::new(),
                target_path: target.display().to_string(),
            },
            "volume_id",
        ),
        (
            NodeUnpublishVolumeRequest {
                volume_id: "v".into(),
                target_path: String::new(),
            },
            "target_path",
        ),
    ] {
        let err = node.node_unpublish_volume(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field));
    }
    // The daemon is unharmed and the target still publishes.
    env.publish("vol-bad", &target)
        .await
        .expect("valid publish after bad ones");
    env.unpublish("vol-bad", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_class_is_not_found_and_new_classes_apply_without_restart() {
    let Some(env) = Env::start(SECRETS) else {
        return;
    };
    let target = env.target("pod-class");
    let mut node = env.node().await;
    let err = node
        .node_publish_volume(publish_request("vol-c", &target, "later"))
        .await
        .expect_err("class missing");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("default/later"), "{}", err.message());
    assert_nothing_left(&env, &target);

    env.write_class("default", "later", common::PROVIDER, &[]);
    node.node_publish_volume(publish_request("vol-c", &target, "later"))
        .await
        .expect("class now present");
    assert_eq!(std::fs::read(target.join("token")).expect("read"), b"abc");
    env.unpublish("vol-c", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_is_unavailable_then_recovers() {
    let Some(mut env) = Env::new() else { return };
    env.write_secrets(SECRETS);
    env.write_class("default", "app", common::PROVIDER, &[]);
    env.start_driver(&[]);
    let target = env.target("pod-down");

    // No socket at all.
    let err = env
        .publish("vol-d", &target)
        .await
        .expect_err("no provider");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("example"), "{}", err.message());
    assert_nothing_left(&env, &target);

    // A socket file whose process is gone.
    env.start_provider();
    env.kill_provider();
    assert!(env.provider_socket().exists());
    let err = env
        .publish("vol-d", &target)
        .await
        .expect_err("dead provider");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_nothing_left(&env, &target);

    env.start_provider();
    env.publish("vol-d", &target).await.expect("provider back");
    env.unpublish("vol-d", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversing_or_malformed_provider_paths_are_rejected() {
    let Some(env) = Env::start(SECRETS) else {
        return;
    };
    let target = env.target("pod-evil");
    let escape = target.parent().expect("parent").join("escape");
    for bad in [
        "../escape",
        "/etc/evil",
        "a/../../escape",
        "..data/x",
        "a//b",
        "ok/../../../escape",
    ] {
        env.write_secrets(&format!(
            "files:\n  - path: fine\n    contents: x\n  - path: {bad:?}\n    contents: pwned\n"
        ));
        let err = env.publish("vol-evil", &target).await.expect_err(bad);
        assert_eq!(err.code(), Code::FailedPrecondition, "{bad}: {err:?}");
        assert!(err.message().contains("path"), "{bad}: {}", err.message());
        assert!(
            !err.message().contains("pwned"),
            "contents leaked into the error"
        );
        assert_nothing_left(&env, &target);
        assert!(!escape.exists(), "{bad} wrote outside the target");
    }
    env.write_secrets("files:\n  - path: dup\n    contents: a\n  - path: dup\n    contents: b\n");
    let err = env
        .publish("vol-evil", &target)
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("twice"), "{}", err.message());
    assert_nothing_left(&env, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_error_code_is_internal() {
    let Some(env) = Env::start("error: E_FORBIDDEN\n") else {
        return;
    };
    let target = env.target("pod-err");
    let err = env
        .publish("vol-err", &target)
        .await
        .expect_err("provider error");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("E_FORBIDDEN"), "{}", err.message());
    assert_nothing_left(&env, &target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_responses_are_rejected() {
    let Some(mut env) = Env::new() else { return };
    env.write_class("default", "app", common::PROVIDER, &[]);
    env.write_secrets(&format!(
        "files:\n  - path: big\n    contents: {}\n",
        "x".repeat(5000)
    ));
    env.start_provider();
    env.start_driver(&["--max-volume-bytes", "4096"]);
    let target = env.target("pod-big");
    let err = env.publish("vol-big", &target).await.expect_err("too big");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("max-volume-bytes"),
        "{}",
        err.message()
    );
    assert_nothing_left(&env, &target);

    env.write_secrets(&format!(
        "files:\n  - path: fits\n    contents: {}\n",
        "x".repeat(3000)
    ));
    env.publish("vol-big", &target)
        .await
        .expect("under the limit");
    env.unpublish("vol-big", &target).await.expect("unpublish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_info() {
    let Some(env) = Env::start(SECRETS) else {
        return;
    };
    let mut id = env.identity().await;
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "secretfs.csi.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "node-only plugin advertises no controller"
    );
    let probe = id.probe(ProbeRequest {}).await.expect("probe").into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut node = env.node().await;
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("node info")
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    // Only VOLUME_MOUNT_GROUP (6): no STAGE_UNSTAGE, so kubelet never calls NodeStageVolume.
    use secretfs::proto::csi::node_service_capability::Type;
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|Type::Rpc(rpc)| rpc.r#type))
        .collect();
    assert_eq!(rpcs, [6]);
    let err = node
        .node_stage_volume(NodeStageVolumeRequest::default())
        .await
        .expect_err("stage");
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_start_and_shutdown() {
    let Some(mut env) = Env::new() else { return };
    env.write_secrets(SECRETS);
    env.write_class("default", "app", common::PROVIDER, &[]);
    env.start_provider();
    // A stale socket file from an earlier run does not stop the driver.
    std::fs::write(&env.csi_socket, b"stale").expect("stale socket");
    env.start_driver(&[]);

    // No core dumps, ever.
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", env.driver_pid())).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert_eq!(
        core.split_whitespace().filter(|w| *w == "0").count(),
        2,
        "{core}"
    );

    let target = env.target("pod-restart");
    env.publish("vol-r", &target).await.expect("publish");

    // SIGTERM: clean exit, socket removed, the mount is left for a successor.
    let status = env.stop_driver();
    assert!(status.success(), "driver exit: {status}");
    assert!(!env.csi_socket.exists(), "socket left behind");
    assert_eq!(
        env.mounts(),
        vec![target.clone()],
        "mount should be left in place"
    );

    // A new driver finds the dead mount at the target and replaces it.
    env.start_driver(&[]);
    env.publish("vol-r", &target)
        .await
        .expect("republish over a stale mount");
    assert_eq!(std::fs::read(target.join("token")).expect("read"), b"abc");
    assert_eq!(env.mounts().len(), 1, "{:?}", env.mounts());
    env.unpublish("vol-r", &target).await.expect("unpublish");
    assert_nothing_left(&env, &target);
}
