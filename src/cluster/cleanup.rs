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
        marked_since: HashMap::new(),
    };
    tracing::info!(
        driver = %cfg.driver_name,
        interval = ?cfg.interval,
        node_gone_grace = ?cfg.node_gone_grace,
        lease = %format!("{}/{}", cfg.lease_namespace, cfg.lease_name),
        identity = %cfg.identity,
        "cleanup controller started"
    );
    // Renewed at least three times per lease duration, so one slow answer does not lose it.
    let tick = cfg.interval.min(RENEW_EVERY).min(cfg.lease_duration / 3);
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
                controller.marked_since.clear();
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
    /// PVs (by uid) seen marked lost, since when: a mark waits out the grace too, so a node
    /// that marked by mistake (a disk mounted late) can clear it at its next start.
    marked_since: HashMap<String, Instant>,
}

impl Controller {
    async fn pass(
        &mut self,
        cluster: &Cluster<'_>,
        election: &LeaderElection,
    ) -> Result<(), ClusterError> {
        // PVs first: a node that joins between the two lists is then seen with its PVs.
        let pvs: Vec<DriverPv> = cluster
            .persistent_volumes()
            .await?
            .iter()
            .filter_map(|pv| DriverPv::of(pv, &self.driver))
            .collect();
        let nodes: HashSet<String> = cluster.node_names().await?.into_iter().collect();
        let now = Instant::now();
        self.missing_since.retain(|n, _| !nodes.contains(n));
        self.marked_since
            .retain(|uid, _| pvs.iter().any(|pv| &pv.uid == uid && pv.lost.is_some()));
        let mut released = 0;
        for pv in &pvs {
            let seen = Seen {
                nodes: &nodes,
                missing_since: &mut self.missing_since,
                marked_since: &mut self.marked_since,
                now,
                grace: self.grace,
            };
            let Some(reason) = verdict(pv, seen) else {
                continue;
            };
            if !election.leading() {
                tracing::info!("the lease ran out during a pass; the next holder finishes it");
                break;
            }
            match release(cluster, pv, &reason).await {
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

/// What a pass knows when it judges one PV.
struct Seen<'a> {
    nodes: &'a HashSet<String>,
    missing_since: &'a mut HashMap<String, Instant>,
    marked_since: &'a mut HashMap<String, Instant>,
    now: Instant,
    grace: Duration,
}

/// Why `pv` must be released now, or None. A node is counted missing, and a mark counted, from
/// the first pass that sees it; the PV goes once that has lasted the grace.
fn verdict(pv: &DriverPv, seen: Seen<'_>) -> Option<String> {
    let waited = |since: Instant| seen.now.duration_since(since) >= seen.grace;
    if let Some(why) = &pv.lost {
        let since = *seen.marked_since.entry(pv.uid.clone()).or_insert(seen.now);
        return waited(since)
            .then(|| format!("its node's pool no longer holds the volume ({why})"));
    }
    let node = pv.node.as_ref()?;
    if seen.nodes.contains(node) {
        return None;
    }
    let since = *seen.missing_since.entry(node.clone()).or_insert(seen.now);
    waited(since).then(|| format!("node {node} no longer exists"))
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
        cluster.delete_pv(&pv.name, &pv.uid).await?;
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

    struct Memory {
        nodes: HashSet<String>,
        missing_since: HashMap<String, Instant>,
        marked_since: HashMap<String, Instant>,
    }

    impl Memory {
        fn new() -> Memory {
            Memory {
                nodes: ["n1".to_string()].into(),
                missing_since: HashMap::new(),
                marked_since: HashMap::new(),
            }
        }

        fn judge(&mut self, pv: &DriverPv, now: Instant, grace: Duration) -> Option<String> {
            verdict(
                pv,
                Seen {
                    nodes: &self.nodes,
                    missing_since: &mut self.missing_since,
                    marked_since: &mut self.marked_since,
                    now,
                    grace,
                },
            )
        }
    }

    #[test]
    fn a_missing_node_waits_out_the_grace() {
        let mut m = Memory::new();
        let t0 = Instant::now();
        let grace = Duration::from_secs(300);
        assert_eq!(m.judge(&driver_pv("n1"), t0, grace), None);
        assert!(m.missing_since.is_empty());
        assert_eq!(m.judge(&driver_pv("n2"), t0, grace), None);
        let later = t0 + Duration::from_secs(299);
        assert_eq!(m.judge(&driver_pv("n2"), later, grace), None);
        assert_eq!(
            m.judge(&driver_pv("n2"), t0 + grace, grace).as_deref(),
            Some("node n2 no longer exists")
        );
        assert!(
            m.judge(&driver_pv("n3"), t0, Duration::ZERO).is_some(),
            "no grace: at once"
        );
    }

    #[test]
    fn a_lost_mark_waits_out_the_grace_and_an_unpinned_pv_never_goes() {
        let mut m = Memory::new();
        let mut lost = driver_pv("n1");
        lost.lost = Some("wiped".into());
        let t0 = Instant::now();
        let grace = Duration::from_secs(300);
        assert_eq!(m.judge(&lost, t0, grace), None);
        let why = m.judge(&lost, t0 + grace, grace);
        assert!(why.is_some_and(|w| w.contains("wiped")));
        let mut unpinned = driver_pv("n9");
        unpinned.node = None;
        assert_eq!(m.judge(&unpinned, t0, Duration::ZERO), None);
    }
}
