//! The CSI v1.12.0 types and gRPC services, generated from proto/csi.proto by build.rs.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
