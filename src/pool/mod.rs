//! Carving: the node's pools, the disks (directories) under them, the volume files on each
//! disk, and how much of each disk is still free to promise.

mod device;
mod error;
mod loops;
mod pools;

pub(crate) use error::PoolError;
pub(crate) use loops::LoopIndex;
pub(crate) use pools::{Disk, PoolSpec, Pools, VolumeFile, valid_pool_name};
