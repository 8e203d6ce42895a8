//! Generates the CSI and provider-plugin gRPC code. `protox` parses the .proto files in
//! Rust, so a fresh machine needs nothing but cargo (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["csi.proto", "provider/v1alpha1/service.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        // Messages that carry secrets or tokens get a hand-written, redacting Debug
        // (src/proto.rs) so that no `{:?}` can print them.
        .skip_debug([
            ".v1alpha1.MountRequest",
            ".v1alpha1.File",
            ".csi.v1.NodePublishVolumeRequest",
            ".csi.v1.NodeStageVolumeRequest",
            ".csi.v1.NodeExpandVolumeRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
