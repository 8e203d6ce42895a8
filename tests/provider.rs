//! The example provider speaks the upstream provider protocol: checked here with a plain
//! tonic client, independent of the driver.

mod common;

use hyper_util::rt::TokioIo;
use secretfs::proto::provider::csi_driver_provider_client::CsiDriverProviderClient;
use secretfs::proto::provider::{MountRequest, VersionRequest};
use tonic::Code;
use tonic::transport::{Endpoint, Uri};

fn request() -> MountRequest {
    MountRequest {
        attributes: "{}".into(),
        secrets: "{}".into(),
        target_path: "/tmp/x".into(),
        permission: "420".into(),
        current_object_version: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_provider_requires_localhost_authority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets.yaml");
    std::fs::write(
        &secrets,
        "version: v9\nfiles:\n  - path: a\n    contents: hi\n    mode: 288\n",
    )
    .expect("write");
    let socket = dir.path().join("p.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let socket = socket.clone();
        async move {
            let provider = secretfs::provider::example::ExampleProvider::new(secrets, false);
            secretfs::provider::example::serve(&socket, provider, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    while !socket.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Our client sets :authority to localhost and is served.
    let mut good =
        CsiDriverProviderClient::new(secretfs::grpc_uds::connect(&socket).await.expect("connect"));
    let resp = good.mount(request()).await.expect("mount").into_inner();
    assert_eq!(resp.files.len(), 1);
    assert_eq!(
        (resp.files[0].path.as_str(), resp.files[0].mode),
        ("a", 288)
    );
    assert_eq!(resp.files[0].contents, b"hi");
    assert_eq!(resp.object_version[0].version, "v9");
    let version = good
        .version(VersionRequest {
            version: "v1alpha1".into(),
        })
        .await
        .expect("version");
    assert_eq!(
        version.into_inner().runtime_name,
        "secretfs-example-provider"
    );

    // Any other authority is refused, as upstream providers do.
    let path = socket.clone();
    let channel = Endpoint::from_static("http://example.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("connect");
    let err = CsiDriverProviderClient::new(channel)
        .mount(request())
        .await
        .expect_err("wrong authority");
    assert_eq!(err.code(), Code::PermissionDenied);

    let _ = stop.send(());
    server.await.expect("join").expect("serve");
}
