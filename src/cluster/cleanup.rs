//! The cleanup controller (`sealvol cleanup`): releases the PVs no node can serve any more.
//! A sealvol PV is pinned to its node, and only that node's provisioner deletes it; when the
//! node is gone (scale-down, replacement, repair), its PVs stay forever and pods bound to them
//! stay Pending. While it holds the lease, every interval the controller lists the nodes and
//! this driver's PVs, and releases each PV whose node has been missing for the grace, or which
//! its node plugin marked lost: a Warning event `VolumeLost` on the claim, then the PV deleted
//! and its finalizers removed. Each step is idempotent, so a pass cut short is finished by the
//! next one.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::lease::LeaderElection;
use super::{Cluster, ClusterError, DriverPv};
use crate::identity::KubeApi;

/// How often the lease is renewed (and at most how long between passes' checks).
const RENEW_EVERY: Duration = Duration::from_secs(5);

pub struct CleanupConfig {
    pub driver_name: String,
    pub interval: Duration,
    pub node_gone_grace: Duration,
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub identity: String,
    /// The API server (default: in-cluster), for tests.
    pub kube_api_url: Option<String>,
    pub kube_token_file: Option<PathBuf>,
    pub kube_ca_file: Option<PathBuf>,
}

/// Runs until `shutdown` resolves; gives the lease up then.
pub async fn run_cleanup(
    cfg: CleanupConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ClusterError> {
    let api = match &cfg.kube_api_url {
        Some(url) => KubeApi::new(
            url,
            cfg.kube_token_file.clone().unwrap_or_else(|| {
                PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
            }),
            cfg.kube_ca_file.clone(),
        ),
        None => KubeApi::in_cluster().and_then(|a| {
            a.ok_or_else(|| {
                "not in a cluster (KUBERNETES_SERVICE_HOST is unset) and no --kube-api-url".into()
            })
        }),
    }
    .map_err(ClusterError::Api)?;
    let cluster = Cluster::new(&api);
    let mut election = LeaderElection::new(
        &cfg.lease_namespace,
        &cfg.lease_name,
        &cfg.identity,
        cfg.lease_duration,
    );
    let mut controller = Controller {
        driver: cfg.driver_name.clone(),
        grace: cfg.node_gone_grace,
        missing_since: HashMap::new(),
    };
    tracing::info!(
        driver = %cfg.driver_name,
        interval = ?cfg.interval,
        node_gone_grace = ?cfg.node_gone_grace,
        lease = %format!("{}/{}", cfg.lease_namespace, cfg.lease_name),
        identity = %cfg.identity,
        "cleanup controller started"
    );
    let tick = cfg.interval.min(RENEW_EVERY);
    let mut next_pass = Instant::now();
    let mut was_leading = false;
    tokio::pin!(shutdown);
    loop {
        let leading = match election.try_acquire_or_renew(&cluster).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the lease; not acting until it is held again");
                election.leading()
            }
        };
        if leading != was_leading {
            if leading {
                tracing::info!(identity = %cfg.identity, "leading: releasing the PVs no node can serve");
            } else {
                tracing::info!(identity = %cfg.identity, "another replica leads");
                // A new term starts its grace from scratch: what was seen missing may be back.
                controller.missing_since.clear();
            }
            was_leading = leading;
        }
        if leading && Instant::now() >= next_pass {
            if let Err(e) = controller.pass(&cluster, &election).await {
                tracing::warn!(error = %e, "cleanup pass failed; the next one retries");
            }
            next_pass = Instant::now() + cfg.interval;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    if let Err(e) = election.release(&cluster).await {
        tracing::warn!(error = %e, "could not give the lease up; it expires on its own");
    }
    tracing::info!("cleanup controller stopped");
    Ok(())
}

struct Controller {
    driver: String,
    grace: Duration,
    /// Nodes named by a PV but not in the node list, since when.
    missing_since: HashMap<String, Instant>,
}

impl Controller {
    async fn pass(
        &mut self,
        cluster: &Cluster<'_>,
        election: &LeaderElection,
    ) -> Result<(), ClusterError> {
        let nodes: HashSet<String> = cluster.node_names().await?.into_iter().collect();
        let pvs = cluster.persistent_volumes().await?;
        let now = Instant::now();
        self.missing_since.retain(|n, _| !nodes.contains(n));
        let mut released = 0;
        for pv in pvs.iter().filter_map(|pv| DriverPv::of(pv, &self.driver)) {
            let Some(reason) = verdict(&pv, &nodes, &mut self.missing_since, now, self.grace)
            else {
                continue;
            };
            if !election.leading() {
                tracing::info!("the lease ran out during a pass; the next holder finishes it");
                break;
            }
            match release(cluster, &pv, &reason).await {
                Ok(()) => released += 1,
                Err(e) => {
                    tracing::warn!(persistent_volume = %pv.name, error = %e, "could not release; the next pass retries")
                }
            }
        }
        tracing::debug!(
            nodes = nodes.len(),
            released,
            waiting_nodes = self.missing_since.len(),
            "cleanup pass"
        );
        Ok(())
    }
}

/// Why `pv` must be released now, or None. A node is counted missing from the first pass that
/// does not see it; its PVs go once it has stayed missing for `grace`.
fn verdict(
    pv: &DriverPv,
    nodes: &HashSet<String>,
    missing_since: &mut HashMap<String, Instant>,
    now: Instant,
    grace: Duration,
) -> Option<String> {
    if let Some(why) = &pv.lost {
        return Some(format!(
            "its node's pool no longer holds the volume ({why})"
        ));
    }
    let node = pv.node.as_ref()?;
    if nodes.contains(node) {
        return None;
    }
    let since = *missing_since.entry(node.clone()).or_insert(now);
    (now.duration_since(since) >= grace).then(|| format!("node {node} no longer exists"))
}

/// The event on a bound claim, then the PV's deletion, then its finalizers.
async fn release(cluster: &Cluster<'_>, pv: &DriverPv, reason: &str) -> Result<(), ClusterError> {
    if !pv.deleting {
        if pv.phase == "Bound"
            && let Some(claim) = &pv.claim
        {
            let message = format!(
                "PersistentVolume {} (volume {}) was released: {reason}. Its data is gone. Delete this claim and the pods that use it, then create it again; for a generic ephemeral volume, delete the pod and its owner makes a new one.",
                pv.name, pv.volume_id
            );
            cluster.warn_claim(claim, "VolumeLost", &message).await?;
        }
        cluster.delete_pv(&pv.name).await?;
    }
    cluster.drop_finalizers(&pv.name).await?;
    tracing::warn!(
        persistent_volume = %pv.name,
        volume.id = %pv.volume_id,
        claim = %pv.claim.as_ref().map(|c| format!("{}/{}", c.namespace, c.name)).unwrap_or_default(),
        reason,
        "released a PersistentVolume no node can serve"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::pv;
    use super::*;

    fn driver_pv(node: &str) -> DriverPv {
        DriverPv::of(&pv("p", "d", node, "Bound"), "d").expect("ours")
    }

    #[test]
    fn a_missing_node_waits_out_the_grace() {
        let nodes: HashSet<String> = ["n1".to_string()].into();
        let mut missing = HashMap::new();
        let t0 = Instant::now();
        let grace = Duration::from_secs(300);
        assert_eq!(
            verdict(&driver_pv("n1"), &nodes, &mut missing, t0, grace),
            None
        );
        assert!(missing.is_empty());
        assert_eq!(
            verdict(&driver_pv("n2"), &nodes, &mut missing, t0, grace),
            None
        );
        let later = t0 + Duration::from_secs(299);
        assert_eq!(
            verdict(&driver_pv("n2"), &nodes, &mut missing, later, grace),
            None
        );
        let after = t0 + grace;
        assert_eq!(
            verdict(&driver_pv("n2"), &nodes, &mut missing, after, grace).as_deref(),
            Some("node n2 no longer exists")
        );
        assert!(
            verdict(&driver_pv("n3"), &nodes, &mut missing, t0, Duration::ZERO).is_some(),
            "no grace: at once"
        );
    }

    #[test]
    fn a_pv_marked_lost_goes_at_once_and_an_unpinned_one_never() {
        let nodes: HashSet<String> = ["n1".to_string()].into();
        let mut missing = HashMap::new();
        let mut lost = driver_pv("n1");
        lost.lost = Some("wiped".into());
        let why = verdict(&lost, &nodes, &mut missing, Instant::now(), Duration::MAX);
        assert!(why.is_some_and(|w| w.contains("wiped")));
        let mut unpinned = driver_pv("n9");
        unpinned.node = None;
        assert_eq!(
            verdict(
                &unpinned,
                &nodes,
                &mut missing,
                Instant::now(),
                Duration::ZERO
            ),
            None
        );
    }
}
