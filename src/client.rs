//! A CSI client over the driver's unix socket, as kubelet and the sidecars connect: used by
//! `sealvol bench`, `sealvol demo` and the integration tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::proto::csi::v1::controller_client::ControllerClient;
use crate::proto::csi::v1::identity_client::IdentityClient;
use crate::proto::csi::v1::node_client::NodeClient;

/// The three CSI services on one connection.
#[derive(Clone)]
pub struct CsiClient {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl CsiClient {
    /// Connects to the socket at `path` (no `unix://` prefix).
    pub async fn connect(path: &Path) -> Result<CsiClient, tonic::transport::Error> {
        let path: PathBuf = path.to_path_buf();
        // The URI is required by the API and unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://[::1]:50051")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await?;
        Ok(CsiClient {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }
}
