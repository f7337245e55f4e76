//! The identity gate, tried as an attacker would, on one node with several identities: three
//! authorized identities (a, b, c) and a stranger (s, federated, no role), both key modes,
//! PVC and inline volumes, shared and separate, in both orders, with re-authorization due on
//! every republish. A stranger never gets a volume; every Key Vault request the emulator
//! records carries the identity of the pod being served; a revoked identity's publication
//! opens no new file, not through another identity's republish and not after a restart; and
//! one identity's revocation never touches another identity's separate volumes.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

use sealvol::harness::keys::with_pod_token;
use sealvol_azure_emulator::{Config, Emulator, Options, RoleAssignment, TokenRequest};
use serde_json::json;

const TENANT: &str = "00000000-0000-4000-8000-0000000000aa";
const AUD: &str = "api://AzureADTokenExchange";
/// (service account, client id, object id); "s" is the stranger.
const IDS: &[(&str, &str, &str)] = &[
    (
        "a",
        "00000000-0000-4000-8000-00000000000a",
        "10000000-0000-4000-8000-00000000000a",
    ),
    (
        "b",
        "00000000-0000-4000-8000-00000000000b",
        "10000000-0000-4000-8000-00000000000b",
    ),
    (
        "c",
        "00000000-0000-4000-8000-00000000000c",
        "10000000-0000-4000-8000-00000000000c",
    ),
    (
        "s",
        "00000000-0000-4000-8000-00000000000f",
        "10000000-0000-4000-8000-00000000000f",
    ),
];
const MODES: &[&str] = &["keyvault-key", "keyvault-secret"];

fn who(sa: &str) -> (&'static str, &'static str) {
    let (_, client, oid) = IDS.iter().find(|(s, _, _)| *s == sa).unwrap();
    (client, oid)
}

fn role(sa: &str, mode: &str) -> RoleAssignment {
    let (role, scope) = match mode {
        "keyvault-key" => (
            "Key Vault Crypto Service Encryption User",
            "/vaults/kv/keys/kek",
        ),
        _ => ("Key Vault Secrets User", "/vaults/kv/secrets/kek-secret"),
    };
    RoleAssignment {
        principal: who(sa).1.into(),
        role: role.into(),
        scope: scope.into(),
    }
}

struct Gate {
    /// Key Vault requests checked to carry the served pod's identity.
    checked: usize,
    emu: Emulator,
    node: ScratchNode,
    c: CsiClient,
}

impl Gate {
    async fn start() -> Gate {
        require_root();
        let identities: Vec<_> = IDS
            .iter()
            .map(|(sa, client, oid)| {
                json!({"name": sa, "client_id": client, "object_id": oid,
                "federated_credentials": [{"name": sa, "issuer": "{emulator}/issuers/cluster",
                    "subject": format!("system:serviceaccount:default:{sa}")}]})
            })
            .collect();
        let mut roles = Vec::new();
        for (sa, _, _) in IDS.iter().filter(|(sa, _, _)| *sa != "s") {
            for mode in MODES {
                roles.push(serde_json::to_value(role(sa, mode)).unwrap());
            }
        }
        let config = Config::parse(
            &json!({
                "tenants": [{"id": TENANT, "identities": identities}],
                "issuers": ["cluster"],
                "vaults": [{"name": "kv", "tenant": TENANT, "keys": [{"name": "kek"}],
                    "secrets": [{"name": "kek-secret", "value": "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA="}]}],
                "role_assignments": roles,
            })
            .to_string(),
        )
        .unwrap();
        let emu = Emulator::start(Options {
            config,
            admin: true,
            ..Options::default()
        })
        .await
        .unwrap();
        let mut node = ScratchNode::new(&binary(), None).unwrap();
        let ca = node.root.join("emulator-ca.pem");
        std::fs::write(&ca, &emu.ca_cert_pem).unwrap();
        let vault_host = emu
            .vault_url("kv")
            .unwrap()
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let args = [
            format!("--authority-host={}", emu.base_url),
            format!("--ca-file={}", ca.display()),
            format!("--tenant-id={TENANT}"),
            "--keyvault-verify-challenge=false".into(),
            format!("--allowed-vault-hosts={vault_host}"),
            "--reauthorize-interval=0s".into(),
            "--revoke-grace=1h".into(),
            "--refused-inline-ttl=1s".into(),
            "--log-format=json".into(),
        ];
        node = node.with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let c = node.start(&[]).await.unwrap();
        Gate {
            checked: 0,
            emu,
            node,
            c,
        }
    }

    async fn restart(&mut self) {
        self.node.kill();
        self.c = self.node.start(&[]).await.unwrap();
    }

    fn token(&self, sa: &str) -> String {
        self.emu
            .mint_token(
                "cluster",
                &TokenRequest {
                    namespace: "default".into(),
                    service_account: sa.into(),
                    audiences: vec![AUD.into()],
                    pod_name: None,
                    pod_uid: None,
                    ttl_secs: 3600,
                    offset_secs: 0,
                },
            )
            .unwrap()
    }

    /// Parameters naming the client id of `sa` (as a StorageClass or inline volume would).
    fn params(&self, mode: &str, sa: &str) -> Vec<(String, String)> {
        let mut p = vec![
            ("keyMode".to_string(), mode.to_string()),
            ("keyVaultURL".to_string(), self.emu.vault_url("kv").unwrap()),
            ("clientID".to_string(), who(sa).0.to_string()),
        ];
        match mode {
            "keyvault-secret" => p.push(("secretName".into(), "kek-secret".into())),
            _ => p.push(("keyName".into(), "kek".into())),
        }
        p
    }

    /// A PVC volume, created and staged, for identity `sa`'s client id.
    async fn pvc(&mut self, name: &str, mode: &str, sa: &str) -> String {
        let params = self.params(mode, sa);
        let refs: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let id = create_with(&mut self.c, name, 32 * MIB, &refs).await;
        self.c
            .node
            .node_stage_volume(self.node.stage(&id))
            .await
            .unwrap();
        id
    }

    /// NodePublishVolume as kubelet makes it for pod `pod` running as `sa`, checking that every
    /// Key Vault request it caused carried `sa`'s own identity.
    async fn publish(
        &mut self,
        id: &str,
        pod: &str,
        sa: &str,
        inline: Option<&[(String, String)]>,
    ) -> Result<(), tonic::Status> {
        let mut req = self.node.publish(id, pod);
        if let Some(attributes) = inline {
            req.staging_target_path = String::new();
            req.volume_context
                .insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
            req.volume_context.insert("size".into(), "32Mi".into());
            for (k, v) in attributes {
                req.volume_context.insert(k.clone(), v.clone());
            }
        }
        with_pod_token(&mut req, &self.token(sa), AUD, "default", sa, true);
        req.volume_context
            .insert("csi.storage.k8s.io/pod.name".into(), pod.into());
        self.emu.clear_records();
        let result = self.c.node.node_publish_volume(req).await.map(|_| ());
        for r in self.emu.records() {
            if let Some(oid) = &r.object_id {
                self.checked += 1;
                assert_eq!(
                    oid,
                    who(sa).1,
                    "serving pod {pod} ({sa}), Key Vault saw another identity's token: {r:?}"
                );
            }
        }
        result
    }

    /// Waits for `--refused-inline-ttl` to remove every refused inline volume.
    async fn await_refused_inline_removed(&self) {
        for _ in 0..100 {
            if !self.node.pool_files().iter().any(|f| f.starts_with("csi-")) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("refused inline volumes left: {:?}", self.node.pool_files());
    }

    fn can_open(&self, id: &str, pod: &str) -> bool {
        let target = self.node.target_path(pod, id);
        std::fs::read(format!("{target}/marker")).is_ok()
            && std::fs::write(format!("{target}/new-{}", rand_suffix()), b"x").is_ok()
    }

    fn key_in_kernel(&self, id: &str) -> bool {
        let identifier = common::azure::identifier(&self.node, id);
        sealvol::harness::keys::key_present(Path::new(&self.node.staging_path(id)), &identifier)
            .unwrap()
    }

    fn write_marker(&self, id: &str, pod: &str) {
        std::fs::write(
            format!("{}/marker", self.node.target_path(pod, id)),
            b"data",
        )
        .unwrap();
    }

    async fn unpublish(&mut self, id: &str, pod: &str) {
        self.c
            .node
            .node_unpublish_volume(self.node.unpublish(id, pod))
            .await
            .unwrap();
    }

    fn assert_checked(&self) {
        assert!(
            self.checked > 5,
            "the emulator recorded only {} authenticated Key Vault requests",
            self.checked
        );
    }

    async fn remove(&mut self, id: &str) {
        self.c
            .node
            .node_unstage_volume(self.node.unstage(id))
            .await
            .unwrap();
        delete(&mut self.c, id).await.unwrap();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn inline_id(tag: char) -> String {
    format!("csi-{}", tag.to_string().repeat(64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_never_gets_a_volume_in_either_order() {
    for mode in MODES {
        // Authorized pod first, then the stranger; then the stranger first on a fresh volume.
        let mut g = Gate::start().await;
        let v = g.pvc("pvc-shared", mode, "a").await;
        g.publish(&v, "pod-a", "a", None).await.unwrap();
        g.write_marker(&v, "pod-a");
        let s = g.publish(&v, "pod-s", "s", None).await.unwrap_err();
        assert!(
            matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
            "{mode}: {s:?}"
        );
        assert!(
            !is_mounted(&g.node.target_path("pod-s", &v)),
            "{mode}: the stranger got a mount"
        );
        // The stranger's own inline volume, naming a's client id or its own.
        for (client_of, tag) in [("a", '5'), ("s", '6')] {
            let attrs = g.params(mode, client_of);
            let s = g
                .publish(&inline_id(tag), "pod-s-inline", "s", Some(&attrs))
                .await
                .unwrap_err();
            assert!(
                matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
                "{mode}: {s:?}"
            );
        }
        // The authorized pod is untouched by all of it.
        g.publish(&v, "pod-a", "a", None).await.unwrap();
        assert!(g.can_open(&v, "pod-a"));

        let w = g.pvc("pvc-stranger-first", mode, "b").await;
        assert!(g.publish(&w, "pod-s2", "s", None).await.is_err());
        g.publish(&w, "pod-b", "b", None).await.unwrap();
        g.write_marker(&w, "pod-b");
        // An authorized inline volume after the stranger's refusal.
        let attrs = g.params(mode, "c");
        g.publish(&inline_id('c'), "pod-c-inline", "c", Some(&attrs))
            .await
            .unwrap();
        g.unpublish(&inline_id('c'), "pod-c-inline").await;
        for (id, pod) in [(&v, "pod-a"), (&w, "pod-b")] {
            g.unpublish(id, pod).await;
            g.remove(id).await;
        }
        g.assert_checked();
        // The stranger's refused inline volumes were kept keyless for kubelet's retries, and
        // the timer removes them.
        g.await_refused_inline_removed().await;
        assert_clean(&g.node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_holds_per_publication_and_survives_a_restart() {
    for mode in MODES {
        let mut g = Gate::start().await;
        // a and b share one volume; c has its own; a also has a separate one.
        let shared = g.pvc("pvc-ab", mode, "a").await;
        let own_c = g.pvc("pvc-c", mode, "c").await;
        g.publish(&shared, "pod-a", "a", None).await.unwrap();
        g.write_marker(&shared, "pod-a");
        g.publish(&shared, "pod-b", "b", None).await.unwrap_err();
        // b's pod names a's client id through the StorageClass, but the token is b's: Entra
        // refuses the assertion (no federated credential of a for b's service account).
        let shared_b = g.pvc("pvc-ab-b", mode, "b").await;
        g.publish(&shared_b, "pod-b", "b", None).await.unwrap();
        g.write_marker(&shared_b, "pod-b");
        g.publish(&own_c, "pod-c", "c", None).await.unwrap();
        g.write_marker(&own_c, "pod-c");
        // A second publication of a's volume by a's second pod: shared, same identity.
        g.publish(&shared, "pod-a2", "a", None).await.unwrap();

        assert!(g.emu.revoke_role(&role("a", mode)));
        let s = g.publish(&shared, "pod-a", "a", None).await.unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{mode}: {s:?}");
        assert!(!g.key_in_kernel(&shared), "{mode}: locked");
        assert!(
            !g.can_open(&shared, "pod-a2"),
            "{mode}: another publication still opens files"
        );
        // The other publication's republish does not unlock it; it names the refused pod.
        let s = g.publish(&shared, "pod-a2", "a", None).await.unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{mode}: {s:?}");
        assert!(s.message().contains("pod-a"), "{}", s.message());
        assert!(!g.key_in_kernel(&shared), "{mode}: flapped open");
        // Nor does a new publication, even by an authorized identity's pod.
        g.emu.assign_role(role("a", mode));
        let s = g.publish(&shared, "pod-a3", "a", None).await.unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{mode}: {s:?}");
        assert!(!g.key_in_kernel(&shared));
        assert!(g.emu.revoke_role(&role("a", mode)));
        // Other identities' separate volumes are untouched.
        for (id, pod, sa) in [(&shared_b, "pod-b", "b"), (&own_c, "pod-c", "c")] {
            g.publish(id, pod, sa, None).await.unwrap();
            assert!(g.can_open(id, pod), "{mode}: {sa}'s volume");
        }

        // A restart keeps all of it.
        g.restart().await;
        let s = g.publish(&shared, "pod-a2", "a", None).await.unwrap_err();
        assert_eq!(
            s.code(),
            Code::FailedPrecondition,
            "{mode}: after restart: {s:?}"
        );
        assert!(!g.key_in_kernel(&shared), "{mode}: unlocked by a restart");
        for (id, pod, sa) in [(&shared_b, "pod-b", "b"), (&own_c, "pod-c", "c")] {
            g.publish(id, pod, sa, None).await.unwrap();
            assert!(g.can_open(id, pod), "{mode}: {sa}'s volume after restart");
        }

        // The refused pod goes; authorized again, the other publication unlocks the volume.
        g.unpublish(&shared, "pod-a").await;
        g.emu.assign_role(role("a", mode));
        g.publish(&shared, "pod-a2", "a", None).await.unwrap();
        assert!(g.key_in_kernel(&shared));
        assert!(
            g.can_open(&shared, "pod-a2"),
            "{mode}: data intact after unlock"
        );

        let log = g.node.log();
        assert_eq!(
            log.matches("\"event\":\"lock\"").count(),
            1,
            "{mode}: one lock audited, not one per retry"
        );
        for (id, pod) in [(&shared, "pod-a2"), (&shared_b, "pod-b"), (&own_c, "pod-c")] {
            g.unpublish(id, pod).await;
            g.remove(id).await;
        }
        g.assert_checked();
        assert_clean(&g.node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_kek_refuses_a_first_publish() {
    // Key Vault still allows wrapKey on a disabled key; only the pod's unwrap is a gate.
    let mut g = Gate::start().await;
    let v = g.pvc("pvc-disabled", "keyvault-key", "a").await;
    {
        let mut state = g.emu.shared.lock();
        for k in state
            .vaults
            .get_mut("kv")
            .unwrap()
            .keys
            .get_mut("kek")
            .unwrap()
        {
            k.enabled = false;
        }
    }
    let s = g.publish(&v, "pod-a", "a", None).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(!is_mounted(&g.node.target_path("pod-a", &v)));
    g.remove(&v).await;
    assert_clean(&g.node);
}
