//! The CSI Identity and Node services, served by tonic on a unix socket: request validation
//! and the mapping of errors to gRPC status codes.

mod identity;
mod node;
mod status;

use std::path::Path;

pub use identity::IdentityService;
pub use node::{NodeService, publish_request};

use crate::proto::csi::identity_server::IdentityServer;
use crate::proto::csi::node_server::NodeServer;

/// Serves both services on `socket` until `shutdown` resolves; then stops accepting calls and
/// returns once in-flight calls are done.
pub async fn serve(
    socket: &Path,
    identity: IdentityService,
    node: NodeService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let incoming = crate::grpc_uds::listen(socket)?;
    identity.set_ready(true);
    tracing::info!(endpoint = %socket.display(), "CSI server listening");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
