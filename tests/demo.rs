//! `secretfs demo` runs end to end and cleans up after itself.

mod common;

#[test]
fn demo_publishes_reads_and_cleans_up() {
    if !common::fuse_available() {
        return;
    }
    let child = std::process::Command::new(common::BIN)
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run demo");
    let workdir = std::env::temp_dir().join(format!("secretfs-demo-{}", child.id()));
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expect in [
        "NodePublishVolume csi-demo-0001",
        "-r--r-----    0    28  db/password",
        "cat db/username → app",
        "after the read: 0",
        "Read-only file system",
        "mounts left: 0 · target dir left: no",
    ] {
        assert!(stdout.contains(expect), "missing {expect:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains("correct horse"),
        "the demo printed a secret"
    );
    assert!(
        stdout.contains(&workdir.display().to_string()),
        "demo ran elsewhere:\n{stdout}"
    );
    assert!(
        common::mounts_under(&workdir).is_empty(),
        "demo left a mount"
    );
    assert!(!workdir.exists(), "demo left {}", workdir.display());
}
