//! CSI request fields to validated domain values. Every refusal is INVALID_ARGUMENT naming
//! the field and what is accepted.

use std::collections::BTreeMap;

use crate::proto::csi::v1 as csi;
use crate::volume::{
    AccessMode, Capability, CapacityRange, ContentSource, TOPOLOGY_KEY, VolumeError, VolumeId,
    check_fs_type, parse_mount_flags,
};

use csi::volume_capability::AccessType;
use csi::volume_capability::access_mode::Mode;

/// The kubelet key that marks a CSI inline ephemeral volume in `volume_context`.
pub(super) const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

fn invalid(field: &'static str, message: impl Into<String>) -> VolumeError {
    VolumeError::InvalidArgument {
        field,
        message: message.into(),
    }
}

pub(super) fn volume_id(raw: &str) -> Result<VolumeId, VolumeError> {
    if raw.is_empty() {
        return Err(invalid("volume_id", "is required"));
    }
    VolumeId::parse(raw).map_err(|m| invalid("volume_id", m))
}

/// The id of a volume a call expects to exist. An id sealvol could never have issued names no
/// volume of this node: NOT_FOUND (the CSI spec's answer for an unknown volume), and, like any
/// malformed id, it never reaches a path.
pub(super) fn existing_volume_id(raw: &str) -> Result<VolumeId, VolumeError> {
    if raw.is_empty() {
        return Err(invalid("volume_id", "is required"));
    }
    VolumeId::parse(raw).map_err(|m| {
        VolumeError::NotFound(format!(
            "volume_id: {m}, so no such volume exists on this node"
        ))
    })
}

/// CreateVolume's `volume_content_source`: a snapshot or a volume that must exist here
/// (an id sealvol never issued names none: NOT_FOUND).
pub(super) fn content_source(
    source: Option<&csi::VolumeContentSource>,
) -> Result<Option<ContentSource>, VolumeError> {
    use csi::volume_content_source::Type;
    let Some(source) = source else {
        return Ok(None);
    };
    match &source.r#type {
        Some(Type::Snapshot(s)) => VolumeId::parse_snapshot(&s.snapshot_id)
            .map(|id| Some(ContentSource::Snapshot(id)))
            .map_err(|m| {
                VolumeError::NotFound(format!(
                    "volume_content_source.snapshot.snapshot_id: {m}, so no such snapshot exists on this node"
                ))
            }),
        Some(Type::Volume(v)) => VolumeId::parse(&v.volume_id)
            .map(|id| Some(ContentSource::Volume(id)))
            .map_err(|m| {
                VolumeError::NotFound(format!(
                    "volume_content_source.volume.volume_id: {m}, so no such volume exists on this node"
                ))
            }),
        None => Err(invalid(
            "volume_content_source",
            "names neither a snapshot nor a volume",
        )),
    }
}

/// The VolumeSnapshotClass parameter naming the Blob container a snapshot is backed up to.
const BACKUP_URL: &str = "backupURL";

/// The VolumeSnapshotClass parameters: `backupURL` (a backup container) or nothing; the
/// sidecar's own `csi.storage.k8s.io/` keys are ignored.
pub(super) fn snapshot_parameters(
    params: &std::collections::HashMap<String, String>,
) -> Result<Option<String>, VolumeError> {
    match params
        .keys()
        .find(|k| !k.starts_with("csi.storage.k8s.io/") && k.as_str() != BACKUP_URL)
    {
        Some(k) => Err(invalid(
            "parameters",
            format!(
                "{:?} is not a snapshot parameter sealvol knows (it takes {BACKUP_URL} only)",
                k.chars().take(64).collect::<String>()
            ),
        )),
        None => Ok(params.get(BACKUP_URL).cloned()),
    }
}

pub(super) fn capacity_range(range: Option<&csi::CapacityRange>) -> CapacityRange {
    range
        .map(|r| CapacityRange {
            required_bytes: r.required_bytes,
            limit_bytes: r.limit_bytes,
        })
        .unwrap_or_default()
}

pub(super) fn capability(
    cap: Option<&csi::VolumeCapability>,
    field: &'static str,
) -> Result<Capability, VolumeError> {
    let cap = cap.ok_or_else(|| invalid(field, "is required"))?;
    let mount_flags = match &cap.access_type {
        Some(AccessType::Mount(m)) => {
            check_fs_type(&m.fs_type).map_err(|msg| invalid(field, format!("fs_type {msg}")))?;
            parse_mount_flags(&m.mount_flags)?
        }
        Some(AccessType::Block(_)) => {
            return Err(invalid(
                field,
                "block access is not supported: a raw encrypted block device needs the dm-crypt backend, which this node's kernel lacks; use mount access (ext4)",
            ));
        }
        None => return Err(invalid(field, "access_type is required (mount)")),
    };
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    let access_mode = match mode {
        Mode::SingleNodeWriter => AccessMode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly => AccessMode::SingleNodeReaderOnly,
        Mode::SingleNodeSingleWriter => AccessMode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter => AccessMode::SingleNodeMultiWriter,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(invalid(
                field,
                format!(
                    "access mode {} is not supported: a sealvol volume lives on one node's local disk; accepted: SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER",
                    mode.as_str_name()
                ),
            ));
        }
        Mode::Unknown => {
            return Err(invalid(
                field,
                "access_mode is required; accepted: SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER",
            ));
        }
    };
    Ok(Capability {
        access_mode,
        mount_flags,
    })
}

pub(super) fn capabilities(
    caps: &[csi::VolumeCapability],
    field: &'static str,
) -> Result<Vec<Capability>, VolumeError> {
    if caps.is_empty() {
        return Err(invalid(field, "at least one capability is required"));
    }
    caps.iter().map(|c| capability(Some(c), field)).collect()
}

/// The node each requisite topology names (None when it names no sealvol node).
pub(super) fn requisite_nodes(req: Option<&csi::TopologyRequirement>) -> Vec<Option<String>> {
    req.map(|r| {
        r.requisite
            .iter()
            .map(|t| t.segments.get(TOPOLOGY_KEY).cloned())
            .collect()
    })
    .unwrap_or_default()
}

pub(super) fn node_topology(node_id: &str) -> csi::Topology {
    csi::Topology {
        segments: BTreeMap::from([(TOPOLOGY_KEY.to_string(), node_id.to_string())])
            .into_iter()
            .collect(),
    }
}

pub(super) fn is_inline(volume_context: &std::collections::HashMap<String, String>) -> bool {
    volume_context.get(EPHEMERAL_KEY).map(String::as_str) == Some("true")
}

pub(super) fn to_btree(
    map: &std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(mode: Mode, access: AccessType) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(access),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })
    }

    #[test]
    fn single_node_mount_modes_are_accepted() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            assert!(capability(Some(&cap(mode, mount("ext4"))), "c").is_ok());
        }
    }

    #[test]
    fn block_multi_node_and_other_fs_are_refused_with_reasons() {
        let e = capability(
            Some(&cap(
                Mode::SingleNodeWriter,
                AccessType::Block(Default::default()),
            )),
            "volume_capability",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dm-crypt"), "{e}");
        let e = capability(Some(&cap(Mode::MultiNodeMultiWriter, mount(""))), "c")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MULTI_NODE_MULTI_WRITER") && e.contains("one node"),
            "{e}"
        );
        assert!(capability(Some(&cap(Mode::SingleNodeWriter, mount("xfs"))), "c").is_err());
        assert!(capability(None, "c").is_err());
        assert!(capabilities(&[], "c").is_err());
    }
}
