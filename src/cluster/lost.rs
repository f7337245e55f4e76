//! A node plugin's check at start: the PVs that place a volume on this node, against what its
//! pools hold. A temp disk is wiped on deallocation, redeploy and host repair, and the node
//! comes back under its name: its PVs still point at it, their volumes are gone, and their pods
//! would fail to stage forever. The node says so in its log and marks each such PV lost, which
//! the cleanup controller acts on.

use super::{Cluster, ClusterError, DriverPv};
use crate::identity::KubeApi;

/// What the node knows of its pools for the check.
pub(crate) struct PoolEvidence {
    /// The pools' names, for the log.
    pub(crate) pools: String,
    /// Whether no pool holds any volume.
    pub(crate) empty: bool,
    /// Why a missing volume file is not proof that the volume is gone, if it is not: a pool
    /// directory on the state directory's filesystem may be an unmounted disk's mount point.
    pub(crate) doubt: Option<String>,
}

/// Marks lost every live PV of `driver` pinned to `node` whose volume `holds` says this node
/// does not hold, unless `evidence` casts doubt (then it only says so), and clears the mark of
/// those whose volume it holds (a mark made while a disk was not mounted yet). Returns the
/// names of the PVs found missing.
pub(crate) async fn mark_lost_volumes(
    api: &KubeApi,
    driver: &str,
    node: &str,
    holds: impl Fn(&str) -> bool,
    evidence: &PoolEvidence,
) -> Result<Vec<String>, ClusterError> {
    let cluster = Cluster::new(api);
    let ours: Vec<DriverPv> = cluster
        .persistent_volumes()
        .await?
        .iter()
        .filter_map(|pv| DriverPv::of(pv, driver))
        .collect();
    for pv in &ours {
        if pv.node.as_deref() == Some(node) && pv.lost.is_some() && holds(&pv.volume_id) {
            cluster.clear_lost(&pv.name).await?;
            tracing::warn!(persistent_volume = %pv.name, "cleared the lost mark of a PV whose volume this node holds");
        }
    }
    let missing: Vec<&DriverPv> = ours
        .iter()
        .filter(|pv| is_missing_here(pv, node, &holds))
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = missing.iter().map(|pv| pv.name.clone()).collect();
    let state = if evidence.empty {
        "this node's pools are empty"
    } else {
        "volumes are missing from this node's pools"
    };
    if let Some(doubt) = &evidence.doubt {
        tracing::error!(
            node,
            pools = %evidence.pools,
            persistent_volumes = %names.join(","),
            "{state}: the PVs named place their volumes on this node, but its pools do not hold them; not marking them lost because {doubt}. If the disk was wiped, delete the PVs by hand (docs/operations.md)"
        );
        return Ok(names);
    }
    tracing::error!(
        node,
        pools = %evidence.pools,
        persistent_volumes = %names.join(","),
        "{state}: the PVs named place their volumes on this node, but its pools do not hold them (the disk was wiped or replaced); marking them {} for the cleanup controller, which releases them",
        super::LOST_ANNOTATION,
    );
    let reason = format!(
        "node {node} started without this volume in its pools{}",
        if evidence.empty {
            " (they were empty: the disk was wiped or replaced)"
        } else {
            ""
        }
    );
    for pv in &missing {
        cluster.annotate_lost(&pv.name, &reason).await?;
    }
    Ok(names)
}

/// Whether `pv` is bound (or available) on `node`, not being deleted, not yet marked, and its
/// volume is not here. A Released PV is skipped: its volume may be gone already by DeleteVolume,
/// before the provisioner deletes the PV.
fn is_missing_here(pv: &DriverPv, node: &str, holds: impl Fn(&str) -> bool) -> bool {
    pv.node.as_deref() == Some(node)
        && matches!(pv.phase.as_str(), "Bound" | "Available")
        && !pv.deleting
        && pv.lost.is_none()
        && !holds(&pv.volume_id)
}

#[cfg(test)]
mod tests {
    use super::super::tests::pv;
    use super::*;

    fn driver_pv(name: &str, node: &str, phase: &str) -> DriverPv {
        DriverPv::of(&pv(name, "d", node, phase), "d").expect("ours")
    }

    #[test]
    fn only_live_unmarked_pvs_of_this_node_without_their_volume() {
        let holds = |id: &str| id == "sv-held";
        assert!(is_missing_here(
            &driver_pv("gone", "n1", "Bound"),
            "n1",
            holds
        ));
        assert!(is_missing_here(
            &driver_pv("gone", "n1", "Available"),
            "n1",
            holds
        ));
        assert!(!is_missing_here(
            &driver_pv("held", "n1", "Bound"),
            "n1",
            holds
        ));
        assert!(!is_missing_here(
            &driver_pv("gone", "n2", "Bound"),
            "n1",
            holds
        ));
        assert!(!is_missing_here(
            &driver_pv("gone", "n1", "Released"),
            "n1",
            holds
        ));
        let mut marked = driver_pv("gone", "n1", "Bound");
        marked.lost = Some("earlier".into());
        assert!(!is_missing_here(&marked, "n1", holds));
        let mut deleting = driver_pv("gone", "n1", "Bound");
        deleting.deleting = true;
        assert!(!is_missing_here(&deleting, "n1", holds));
    }
}
