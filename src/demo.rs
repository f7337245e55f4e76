//! `sealvol demo`: one encrypted, identity-gated volume's whole life on a scratch loop-file
//! pool, against the Azure emulator (a child process): each step printed with its latency,
//! with proof that the data is encrypted, that the key leaves with the pod, that another
//! identity is refused, and that nothing is left behind.

use base64::Engine;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, ensure};
use sealvol::harness::azure::EmulatorProcess;
use sealvol::harness::keys::{key_present, recorded_identifier, with_pod_token};
use sealvol::harness::{ScratchNode, requests};
use sealvol::proto::csi::v1 as csi;

pub const TENANT: &str = "6c3f0a52-0000-4000-8000-00000000de30";
pub const APP_CLIENT: &str = "0b5e1c3a-1111-4111-8111-00000000de30";
pub const APP_OID: &str = "7d2a9e4f-2222-4222-8222-00000000de30";
const INTRUDER_CLIENT: &str = "0b5e1c3a-1111-4111-8111-00000000de31";
const AUDIENCE: &str = "api://AzureADTokenExchange";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Capacity of the demo volume, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: i64,
}

struct Steps {
    start: Instant,
    n: usize,
}

impl Steps {
    fn begin(&mut self) {
        self.start = Instant::now();
    }

    fn done(&mut self, what: &str, detail: impl AsRef<str>) {
        self.n += 1;
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        println!(
            "{:>2}. {:<38} {:>9.2} ms  {}",
            self.n,
            what,
            ms,
            detail.as_ref()
        );
    }
}

pub fn emulator_config(issuer_sa: &[(&str, &str, &str)]) -> serde_json::Value {
    let identities: Vec<serde_json::Value> = issuer_sa
        .iter()
        .map(|(client, oid, sa)| {
            serde_json::json!({"name": sa, "client_id": client, "object_id": oid, "federated_credentials": [
                {"name": sa, "issuer": "{emulator}/issuers/cluster", "subject": format!("system:serviceaccount:demo:{sa}")}]})
        })
        .collect();
    // A fresh KEK secret per run: none is kept in the binary.
    let mut kek = [0u8; 32];
    let _ = aws_lc_rs::rand::fill(&mut kek);
    let kek_secret = base64::engine::general_purpose::STANDARD.encode(kek);
    serde_json::json!({
        "tenants": [{"id": TENANT, "identities": identities}],
        "issuers": ["cluster"],
        "vaults": [{"name": "demo-kv", "tenant": TENANT, "keys": [{"name": "kek"}],
                    "secrets": [{"name": "kek-secret", "value": kek_secret}]}],
        "role_assignments": [
            {"principal": APP_OID, "role": "Key Vault Crypto Service Encryption User", "scope": "/vaults/demo-kv/keys/kek"},
            {"principal": APP_OID, "role": "Key Vault Secrets User", "scope": "/vaults/demo-kv/secrets/kek-secret"}
        ],
    })
}

/// Searches the allocated ranges of a sparse file for any of `needles`; returns how many
/// bytes it read. Holes hold nothing, so a 1 GiB volume with a few MiB written reads fast.
fn scan_allocated(path: &Path, needles: &[&[u8]]) -> anyhow::Result<(bool, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let finders: Vec<memchr::memmem::Finder> =
        needles.iter().map(memchr::memmem::Finder::new).collect();
    let (mut pos, mut read) = (0u64, 0u64);
    while pos < size {
        let data = match nix::unistd::lseek(f.as_fd(), pos as i64, nix::unistd::Whence::SeekData) {
            Ok(p) => p as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole =
            nix::unistd::lseek(f.as_fd(), data as i64, nix::unistd::Whence::SeekHole)? as u64;
        f.seek(SeekFrom::Start(data))?;
        let mut chunk = vec![0u8; (hole - data) as usize];
        f.read_exact(&mut chunk)?;
        read += chunk.len() as u64;
        if finders.iter().any(|fd| fd.find(&chunk).is_some()) {
            return Ok((true, read));
        }
        pos = hole;
    }
    Ok((false, read))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "sealvol demo needs root: it creates loop devices and mounts"
    );
    let exe = std::env::current_exe().context("locating the sealvol binary")?;
    let mut steps = Steps {
        start: Instant::now(),
        n: 0,
    };
    let scratch = ScratchNode::new(&exe, None)?;
    let azure = EmulatorProcess::start(
        &exe,
        &scratch.root,
        &emulator_config(&[
            (APP_CLIENT, APP_OID, "app"),
            (
                INTRUDER_CLIENT,
                "7d2a9e4f-2222-4222-8222-00000000de31",
                "intruder",
            ),
        ]),
    )?;
    let vault = azure
        .vault_url("demo-kv")
        .context("the emulator has no demo vault")?
        .to_string();
    steps.done(
        "start the Azure emulator",
        format!("Entra ID at {}, Key Vault at {vault}", azure.base_url),
    );

    steps.begin();
    let mut args_owned = azure.node_args(TENANT);
    // Re-authorize on a republish once a publication's authorization is a second old.
    args_owned.push("--reauthorize-interval=1s".to_string());
    let mut node = scratch.with_args(&args_owned.iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = node.start(&[("SEALVOL_LOG", "warn")]).await?;
    steps.done(
        "start the node plugin",
        format!("loop-file pool in {}", node.pool_dir.display()),
    );

    steps.begin();
    let bytes = args.size_mib << 20;
    let params = [
        ("keyMode", "keyvault-key"),
        ("keyVaultURL", vault.as_str()),
        ("keyName", "kek"),
        ("clientID", APP_CLIENT),
    ];
    let volume = client
        .controller
        .create_volume(requests::create("demo-pvc", bytes, &params))
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let id = volume.volume_id.clone();
    steps.done(
        "CreateVolume (keyMode keyvault-key)",
        format!(
            "{id}: {} MiB file, its blocks reserved (thick), no key yet",
            volume.capacity_bytes >> 20
        ),
    );

    steps.begin();
    client.node.node_stage_volume(node.stage(&id)).await?;
    steps.done(
        "NodeStageVolume",
        "loop device, mkfs.ext4 -O encrypt, mount; never a key",
    );

    steps.begin();
    let token = azure.mint_token("cluster", "demo", "app").await?;
    let mut publish = node.publish(&id, "demo-pod");
    with_pod_token(&mut publish, &token, AUDIENCE, "demo", "app", true);
    client.node.node_publish_volume(publish.clone()).await?;
    steps.done(
        "NodePublishVolume as demo/app",
        "token -> Entra ID -> wrapKey, then the pod's own unwrapKey -> fscrypt key, policy, bind",
    );

    steps.begin();
    let target = node.target_path("demo-pod", &id);
    let marker = b"sealvol demo: this sentence is the pod's plaintext";
    std::fs::write(
        format!("{target}/diary-of-the-pod.txt"),
        marker.repeat(2048),
    )
    .context("writing through the mount")?;
    ensure!(
        std::fs::read(format!("{target}/diary-of-the-pod.txt"))? == marker.repeat(2048),
        "read back something else"
    );
    steps.done(
        "the pod writes and reads a file",
        "diary-of-the-pod.txt, 100 KiB",
    );

    steps.begin();
    nix::unistd::sync();
    let img = node.pool_dir.join(format!("{id}.img"));
    let (found, scanned) = scan_allocated(&img, &[marker, b"diary-of-the-pod"])?;
    ensure!(
        !found,
        "the plaintext or the file name is in the backing file"
    );
    steps.done(
        "proof: backing file holds no plaintext",
        format!(
            "scanned its {} KiB of data: neither the text nor the name",
            scanned >> 10
        ),
    );

    steps.begin();
    let wraps = azure.count("keyvault.wrap", Some(200)).await;
    client.node.node_publish_volume(publish).await?;
    let after = azure.count("keyvault.wrap", Some(200)).await
        + azure.count("keyvault.unwrap", Some(200)).await;
    steps.done(
        "NodePublishVolume again (republish)",
        format!("cached token, {} Key Vault calls", after - wraps),
    );

    steps.begin();
    let role = "Key Vault Crypto Service Encryption User";
    let scope = "/vaults/demo-kv/keys/kek";
    azure.set_role(APP_OID, role, scope, false).await?;
    steps.done(
        "revoke: delete the role assignment",
        format!("{role} on {scope}, through the emulator's control plane"),
    );

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    steps.begin();
    let fresh = azure.mint_token("cluster", "demo", "app").await?;
    let mut republish = node.publish(&id, "demo-pod");
    with_pod_token(&mut republish, &fresh, AUDIENCE, "demo", "app", true);
    let denied = client
        .node
        .node_publish_volume(republish.clone())
        .await
        .err()
        .context("a revoked identity kept its volume")?;
    let locked = std::fs::read(format!("{target}/diary-of-the-pod.txt"))
        .err()
        .and_then(|e| e.raw_os_error())
        == Some(libc::ENOKEY);
    ensure!(locked, "the volume is still readable after the revocation");
    steps.done(
        "republish after the 1 s interval",
        format!(
            "refused {:?}: volume locked, reads fail ENOKEY",
            denied.code()
        ),
    );

    steps.begin();
    azure.set_role(APP_OID, role, scope, true).await?;
    client.node.node_publish_volume(republish).await?;
    ensure!(
        std::fs::read(format!("{target}/diary-of-the-pod.txt"))? == marker.repeat(2048),
        "data lost across the lock"
    );
    steps.done(
        "restore the role, republish",
        "unlocked: the key is back, the data intact",
    );

    steps.begin();
    client
        .node
        .node_unpublish_volume(node.unpublish(&id, "demo-pod"))
        .await?;
    let staging = node.staging_path(&id);
    let identifier = recorded_identifier(&img).context("no key identifier in the header")?;
    let present = key_present(Path::new(&staging), &identifier).map_err(anyhow::Error::msg)?;
    ensure!(!present, "the key is still in the kernel");
    steps.done(
        "NodeUnpublishVolume",
        format!("key {}... evicted from the kernel", &identifier[..8]),
    );

    steps.begin();
    let names: Vec<String> = std::fs::read_dir(format!("{staging}/data"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let read = names
        .first()
        .map(|n| std::fs::read(format!("{staging}/data/{n}")));
    let locked = matches!(read, Some(Err(ref e)) if e.raw_os_error() == Some(libc::ENOKEY));
    ensure!(
        locked && !names.iter().any(|n| n.contains("diary")),
        "the data is still readable"
    );
    steps.done(
        "proof: the data is no longer readable",
        format!(
            "names are ciphertext ({}...), reads fail ENOKEY",
            names[0].chars().take(12).collect::<String>()
        ),
    );

    steps.begin();
    let intruder = azure.mint_token("cluster", "demo", "intruder").await?;
    let mut stranger = node.publish(&id, "other-pod");
    with_pod_token(&mut stranger, &intruder, AUDIENCE, "demo", "intruder", true);
    let refused = client
        .node
        .node_publish_volume(stranger)
        .await
        .err()
        .context("an unauthorized pod was let in")?;
    let other_target = node.target_path("other-pod", &id);
    ensure!(
        !Path::new(&other_target)
            .join("diary-of-the-pod.txt")
            .exists(),
        "something was mounted for the intruder"
    );
    let reason: String = refused
        .message()
        .split(" Trace")
        .next()
        .unwrap_or_default()
        .chars()
        .take(90)
        .collect();
    steps.done(
        "NodePublishVolume as demo/intruder",
        format!("refused {:?}, nothing mounted: {reason}", refused.code()),
    );

    steps.begin();
    client.node.node_unstage_volume(node.unstage(&id)).await?;
    steps.done("NodeUnstageVolume", "unmounted, loop device released");

    steps.begin();
    client
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        })
        .await?;
    ensure!(!img.exists(), "the volume file is still there");
    steps.done(
        "DeleteVolume",
        "wrapped key erased from the header, blocks released, file gone",
    );

    let (loops, mounts, files) = (node.loop_devices(), node.mounts(), node.pool_files());
    println!(
        "\nEntra ID exchanges: {}, Key Vault wrap/unwrap calls: {}/{}; left behind: {} loop devices, {} mounts, {} pool files",
        azure.count("entra.token", Some(200)).await,
        azure.count("keyvault.wrap", Some(200)).await,
        azure.count("keyvault.unwrap", Some(200)).await,
        loops.len(),
        mounts.len(),
        files.len()
    );
    ensure!(
        loops.is_empty() && mounts.is_empty() && files.is_empty(),
        "the demo leaked: {loops:?} {mounts:?} {files:?}"
    );
    node.kill();
    Ok(())
}
