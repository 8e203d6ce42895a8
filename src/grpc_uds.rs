//! gRPC over unix sockets, both ways: a client channel whose HTTP/2 `:authority` is
//! `localhost` (what provider plugins expect), and a listener for our own servers.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the gRPC server on the unix socket `path`.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI only sets `:authority`; the connector ignores it and dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}

/// Binds a listening socket at `path`, creating its directory and replacing a stale socket
/// file left by an earlier process.
pub fn listen(path: &Path) -> std::io::Result<UnixListenerStream> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(UnixListenerStream::new(UnixListener::bind(path)?))
}

/// Accepts `unix:///path`, `unix:/path` or a plain absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(format!(
            "endpoint {endpoint:?} must be unix:///absolute/path.sock or an absolute path"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            socket_path("unix:///run/a.sock"),
            Ok(PathBuf::from("/run/a.sock"))
        );
        assert_eq!(
            socket_path("unix:/run/a.sock"),
            Ok(PathBuf::from("/run/a.sock"))
        );
        assert_eq!(socket_path("/run/a.sock"), Ok(PathBuf::from("/run/a.sock")));
        assert!(socket_path("tcp://0.0.0.0:1").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
    }
}
