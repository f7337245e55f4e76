//! Leader election on a coordination.k8s.io/v1 Lease, as client-go does it: the holder renews
//! the lease; another replica takes it over once it has seen the same record, unrenewed, for
//! a whole lease duration on its own clock (so clocks that disagree between nodes do not
//! matter); every write carries the resourceVersion it read, so of two replicas that try at
//! once one gets a conflict. Written here because kube-rs has no leader election and the
//! crates that add one are pinned to older kube versions; it is a page of code.
//!
//! There is no fencing: a holder stalled past its lease may still act once after another took
//! over. What the cleanup controller does is idempotent (post an event, delete a PV, drop
//! finalizers), and it checks `leading` before each release.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

use super::{Cluster, ClusterError};

/// The wall clock as k8s-openapi's timestamp (its jiff is built without `std`, so no `now`).
fn now_timestamp() -> Timestamp {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    Timestamp::new(seconds, since_epoch.subsec_nanos() as i32).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// What identifies a holder's renewal: who, and the renew time it wrote.
type Record = (Option<String>, Option<Timestamp>);

pub(crate) struct LeaderElection {
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    /// The last record seen (holder, renew time) and when it was first seen.
    observed: Option<(Record, Instant)>,
    /// When this replica last wrote the lease as its holder.
    renewed: Option<Instant>,
}

impl LeaderElection {
    pub(crate) fn new(
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> LeaderElection {
        LeaderElection {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: None,
            renewed: None,
        }
    }

    /// Whether this replica holds the lease now, by its own last renewal.
    pub(crate) fn leading(&self) -> bool {
        self.renewed.is_some_and(|at| at.elapsed() < self.duration)
    }

    /// Takes the lease when it is free or expired, renews it when held; whether this replica
    /// holds it afterwards.
    pub(crate) async fn try_acquire_or_renew(
        &mut self,
        cluster: &Cluster<'_>,
    ) -> Result<bool, ClusterError> {
        let now = now_timestamp();
        let seconds = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let lease = match cluster.lease(&self.namespace, &self.name).await? {
            None => Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            },
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let record = (
                    spec.holder_identity.clone(),
                    spec.renew_time.as_ref().map(|t| t.0),
                );
                let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
                // The holder's own duration, as it wrote it: replicas configured differently
                // (an upgrade in progress) still agree on when its lease ends.
                let lasts = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map(Duration::from_secs)
                    .unwrap_or(self.duration);
                if !ours && !free && !self.expired(record, lasts) {
                    self.renewed = None;
                    return Ok(false);
                }
                if !ours {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(seconds);
                lease
            }
        };
        let started = Instant::now();
        match cluster.write_lease(&self.namespace, &lease).await {
            Ok(()) => {
                self.renewed = Some(started);
                Ok(true)
            }
            Err(ClusterError::Conflict(_)) => {
                self.renewed = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `record` has stood unchanged for `lasts` on this replica's clock.
    fn expired(&mut self, record: Record, lasts: Duration) -> bool {
        match &self.observed {
            Some((seen, since)) if *seen == record => since.elapsed() >= lasts,
            _ => {
                self.observed = Some((record, Instant::now()));
                false
            }
        }
    }

    /// Gives the lease up on shutdown, so another replica need not wait for it to expire.
    pub(crate) async fn release(&mut self, cluster: &Cluster<'_>) -> Result<(), ClusterError> {
        if !self.leading() {
            return Ok(());
        }
        self.renewed = None;
        let Some(mut lease) = cluster.lease(&self.namespace, &self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(now_timestamp()));
        spec.lease_duration_seconds = Some(1);
        cluster.write_lease(&self.namespace, &lease).await
    }
}
