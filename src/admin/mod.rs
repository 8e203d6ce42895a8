//! What operators and security teams ask the node: `secretfs doctor` checks the host,
//! `secretfs audit` asks a running driver (over its admin socket) what it holds and how.

pub mod doctor;
pub mod report;

use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use crate::volume::Manager;

/// Serves the audit report as JSON to every connection on `socket` (mode 0600: root only).
pub async fn serve(socket: &Path, manager: Arc<Manager>) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), "admin socket listening");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let manager = Arc::clone(&manager);
        tokio::spawn(async move {
            let report = tokio::task::spawn_blocking(move || report::collect(&manager)).await;
            let body = match report {
                Ok(r) => serde_json::to_vec_pretty(&r).unwrap_or_default(),
                Err(e) => format!("{{\"error\":\"{e}\"}}").into_bytes(),
            };
            let _ = stream.write_all(&body).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Reads the report from a driver's admin socket.
pub async fn fetch(
    socket: &Path,
) -> Result<report::Report, Box<dyn std::error::Error + Send + Sync>> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the driver's admin socket {}: {e}",
            socket.display()
        )
    })?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}
