//! Serving Identity, Controller and Node on one unix socket.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use crate::proto::csi::v1 as csi;
use crate::volume::Manager;

/// What the plugin reports about itself.
#[derive(Debug, Clone)]
pub(crate) struct PluginInfo {
    pub(crate) driver_name: String,
    pub(crate) max_volumes: i64,
    /// Whether expansion works while a volume is published (see volume::NodeSettings).
    pub(crate) online_expansion: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--endpoint {0:?}: expected unix:///absolute/path.sock")]
    Endpoint(String),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Parses `unix:///path` (or `unix:/path`) into the socket path.
pub(crate) fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or_else(|| ServeError::Endpoint(endpoint.to_string()))?;
    Ok(path)
}

/// Binds the socket (replacing a stale one, creating its directory) and serves until
/// `shutdown` completes.
pub(crate) async fn serve(
    manager: Arc<Manager>,
    info: PluginInfo,
    endpoint: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let path = socket_path(endpoint)?;
    let sock_err = |source| ServeError::Socket {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path).map_err(sock_err)?,
        Ok(_) => {
            return Err(sock_err(std::io::Error::other(
                "exists and is not a socket; refusing to remove it",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let listener = UnixListener::bind(&path).map_err(sock_err)?;
    // Only root (kubelet and the sidecars) may talk to the driver.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
    tracing::info!(endpoint, driver = %info.driver_name, "serving CSI");
    tonic::transport::Server::builder()
        .add_service(csi::identity_server::IdentityServer::new(IdentityService {
            manager: Arc::clone(&manager),
            info: info.clone(),
        }))
        .add_service(csi::controller_server::ControllerServer::new(
            ControllerService {
                manager: Arc::clone(&manager),
            },
        ))
        .add_service(csi::node_server::NodeServer::new(NodeService {
            manager,
            info,
        }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
