//! A node plugin's check at start: the PVs that place a volume on this node, against what its
//! pools hold. A temp disk is wiped on deallocation, redeploy and host repair, and the node
//! comes back under its name: its PVs still point at it, their volumes are gone, and their pods
//! would fail to stage forever. The node says so in its log and marks each such PV lost, which
//! the cleanup controller acts on.

use super::{Cluster, ClusterError, DriverPv};
use crate::identity::KubeApi;

/// Marks lost every live PV of `driver` pinned to `node` whose volume `holds` says this node
/// does not hold; returns their names. `pools_empty` only shapes the message.
pub(crate) async fn mark_lost_volumes(
    api: &KubeApi,
    driver: &str,
    node: &str,
    holds: impl Fn(&str) -> bool,
    pools_empty: bool,
) -> Result<Vec<String>, ClusterError> {
    let cluster = Cluster::new(api);
    let missing: Vec<DriverPv> = cluster
        .persistent_volumes()
        .await?
        .iter()
        .filter_map(|pv| DriverPv::of(pv, driver))
        .filter(|pv| is_missing_here(pv, node, &holds))
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = missing.iter().map(|pv| pv.name.clone()).collect();
    tracing::error!(
        node,
        pools_empty,
        count = names.len(),
        persistent_volumes = %names.join(","),
        "{}: the PVs named place their volumes on this node, but its pools do not hold them (the disk was wiped or replaced); marking them {} for the cleanup controller, which releases them",
        if pools_empty { "this node's pools are empty" } else { "volumes are missing from this node's pools" },
        super::LOST_ANNOTATION,
    );
    let reason = format!(
        "node {node} started without this volume in its pools{}",
        if pools_empty {
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
