//! A node plugin in a scratch directory, driven as kubelet and the sidecars would drive it:
//! for `sealvol bench`, `sealvol demo` and the integration tests. It starts `sealvol node` as a
//! child process with a directory pool, a kubelet dir and a state dir under one temporary
//! directory, and on drop kills the child and removes every mount and loop device it left
//! under that directory, so a failed test or benchmark leaks nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::CsiClient;
use crate::sys::{self, LoopDevice, MountTable};

/// Where the scratch node keeps things, all below `root`.
pub struct ScratchNode {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub kubelet_dir: PathBuf,
    pub state_dir: PathBuf,
    pub pool_dir: PathBuf,
    pub log_file: PathBuf,
    pub node_id: String,
    binary: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    keep: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the node plugin exited before serving ({status}); its log: {log}")]
    Exited { status: ExitStatus, log: String },
    #[error("the node plugin did not open its socket within {0:?}")]
    Timeout(Duration),
    #[error("connecting to the node plugin: {0}")]
    Connect(#[from] tonic::transport::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

impl ScratchNode {
    /// Makes the directories under a new temporary directory in `parent` (the system temp
    /// dir when None). `binary` is the `sealvol` executable.
    pub fn new(binary: &Path, parent: Option<&Path>) -> Result<ScratchNode, HarnessError> {
        let tmp = match parent {
            Some(p) => tempfile::Builder::new().prefix("sealvol-").tempdir_in(p),
            None => tempfile::Builder::new().prefix("sealvol-").tempdir(),
        }
        .map_err(io("creating the scratch directory"))?;
        let root = tmp.keep();
        let node = ScratchNode {
            socket: root.join("csi/csi.sock"),
            kubelet_dir: root.join("kubelet"),
            state_dir: root.join("state"),
            pool_dir: root.join("pool"),
            log_file: root.join("node.log"),
            node_id: "scratch-node".into(),
            root,
            binary: binary.to_path_buf(),
            extra_args: Vec::new(),
            child: None,
            keep: std::env::var_os("SEALVOL_KEEP_SCRATCH").is_some(),
        };
        for d in [&node.kubelet_dir, &node.state_dir, &node.pool_dir] {
            std::fs::create_dir_all(d).map_err(io(format!("mkdir {}", d.display())))?;
        }
        Ok(node)
    }

    /// Adds flags for every later start (e.g. another `--pool`).
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Starts `sealvol node` (with `env` added) and waits until its socket accepts
    /// connections.
    pub async fn start(&mut self, env: &[(&str, &str)]) -> Result<CsiClient, HarnessError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(io("opening the node log"))?;
        let log_err = log.try_clone().map_err(io("opening the node log"))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("node")
            .arg(format!("--endpoint=unix://{}", self.socket.display()))
            .arg(format!("--node-id={}", self.node_id))
            .arg(format!("--pool=default={}", self.pool_dir.display()))
            .arg(format!("--state-dir={}", self.state_dir.display()))
            .arg(format!("--kubelet-dir={}", self.kubelet_dir.display()))
            // Tests use unencrypted volumes where encryption is not the point; a test of the
            // policy's default names the flag again (the last one wins).
            .arg("--allowed-key-modes=none,keyvault-key,keyvault-secret")
            .args(&self.extra_args)
            .env_remove("SEALVOL_CRASH_AT")
            .env_remove("SEALVOL_PAUSE_AT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let _ = std::fs::remove_file(&self.socket);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        self.child = Some(child);
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(HarnessError::Exited {
                    status,
                    log: std::fs::read_to_string(&self.log_file).unwrap_or_default(),
                });
            }
            if self.socket.exists()
                && let Ok(client) = CsiClient::connect(&self.socket).await
            {
                return Ok(client);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child's exit status if it has exited (e.g. at a crash point).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the node plugin as `kill -9` would, leaving its mounts and loop devices.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The node plugin's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The peak resident set size of the node plugin, in KiB.
    pub fn rss_max_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Mount points below the scratch directory.
    pub fn mounts(&self) -> Vec<PathBuf> {
        MountTable::read()
            .map(|t| {
                t.entries()
                    .iter()
                    .filter(|m| m.mount_point.starts_with(&self.root))
                    .map(|m| m.mount_point.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Loop devices whose backing file is below the scratch directory.
    pub fn loop_devices(&self) -> Vec<String> {
        let root = self.root.to_string_lossy().into_owned();
        sys::attached_loops()
            .map(|ls| {
                ls.into_iter()
                    .filter(|l| l.backing_file.starts_with(&format!("{root}/")))
                    .map(|l| l.device_path().display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Volume files (complete or not) left in the pool directory.
    pub fn pool_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.pool_dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cleanup(&mut self) {
        self.kill();
        let mut mounts = self.mounts();
        // Deepest (and most recent) first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            let _ = sys::unmount(&m, true);
        }
        let root = self.root.to_string_lossy().into_owned();
        if let Ok(loops) = sys::attached_loops() {
            for l in loops {
                let backing = l.backing_file.trim_end_matches(" (deleted)").to_string();
                if backing.starts_with(&format!("{root}/"))
                    && let Ok(Some(dev)) =
                        LoopDevice::open_existing(l.number, Path::new(&l.backing_file))
                {
                    let _ = dev.detach();
                }
            }
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl Drop for ScratchNode {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Request builders shaped like the ones kubelet and external-provisioner send.
pub mod requests {
    use crate::proto::csi::v1 as csi;
    use csi::volume_capability::access_mode::Mode;

    use super::ScratchNode;

    pub fn mount_capability(mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume {
                    fs_type: "ext4".into(),
                    ..Default::default()
                },
            )),
        }
    }

    pub fn create(name: &str, bytes: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter)],
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    impl ScratchNode {
        /// Where kubelet stages a CSI volume.
        pub fn staging_path(&self, volume_id: &str) -> String {
            format!(
                "{}/plugins/kubernetes.io/csi/sealvol.csi.io/{volume_id}/globalmount",
                self.kubelet_dir.display()
            )
        }

        /// Where kubelet asks a pod's volume to be published.
        pub fn target_path(&self, pod_uid: &str, volume_id: &str) -> String {
            format!(
                "{}/pods/{pod_uid}/volumes/kubernetes.io~csi/{volume_id}/mount",
                self.kubelet_dir.display()
            )
        }

        pub fn stage(&self, volume_id: &str) -> csi::NodeStageVolumeRequest {
            csi::NodeStageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: self.staging_path(volume_id),
                volume_capability: Some(mount_capability(Mode::SingleNodeWriter)),
                ..Default::default()
            }
        }

        pub fn publish(&self, volume_id: &str, pod_uid: &str) -> csi::NodePublishVolumeRequest {
            csi::NodePublishVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: self.staging_path(volume_id),
                target_path: self.target_path(pod_uid, volume_id),
                volume_capability: Some(mount_capability(Mode::SingleNodeWriter)),
                ..Default::default()
            }
        }

        pub fn unpublish(&self, volume_id: &str, pod_uid: &str) -> csi::NodeUnpublishVolumeRequest {
            csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: self.target_path(pod_uid, volume_id),
            }
        }

        pub fn unstage(&self, volume_id: &str) -> csi::NodeUnstageVolumeRequest {
            csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: self.staging_path(volume_id),
            }
        }
    }
}

/// What an encrypted volume's tests look at in the kernel and in kubelet's requests.
pub mod keys {
    use std::path::Path;

    use crate::proto::csi::v1 as csi;

    /// The fscrypt key identifier recorded in a volume file's header.
    pub fn recorded_identifier(volume_file: &Path) -> Option<String> {
        crate::volume::recorded_key_identifier(volume_file)
    }

    /// Whether the fscrypt key `identifier` (hex) is in the filesystem mounted at `fs_root`
    /// (FS_IOC_GET_ENCRYPTION_KEY_STATUS).
    pub fn key_present(fs_root: &Path, identifier: &str) -> Result<bool, String> {
        crate::crypt::key_present(fs_root, identifier).map_err(|e| e.to_string())
    }

    /// Puts the pod's service-account token where kubelet puts it: `secrets` (Kubernetes 1.35+
    /// with serviceAccountTokenInSecrets) or `volume_context`; and the pod's name, namespace and
    /// service account into `volume_context`, as podInfoOnMount does.
    pub fn with_pod_token(
        req: &mut csi::NodePublishVolumeRequest,
        token: &str,
        audience: &str,
        namespace: &str,
        service_account: &str,
        in_secrets: bool,
    ) {
        let tokens = serde_json::json!({audience: {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}}).to_string();
        let key = crate::identity::TOKENS_KEY.to_string();
        if in_secrets {
            req.secrets.insert(key, tokens);
        } else {
            req.volume_context.insert(key, tokens);
        }
        for (k, v) in [
            (
                "csi.storage.k8s.io/pod.name",
                format!("pod-{service_account}"),
            ),
            ("csi.storage.k8s.io/pod.namespace", namespace.to_string()),
            ("csi.storage.k8s.io/pod.uid", "0b0e2a4c-uid".to_string()),
            (
                "csi.storage.k8s.io/serviceAccount.name",
                service_account.to_string(),
            ),
        ] {
            req.volume_context.insert(k.to_string(), v);
        }
    }
}

/// The Azure emulator as a child process (`sealvol-azure-emulator serve --admin`), for the demo
/// and the benchmark: the `sealvol` binary never links the emulator, it talks to it over HTTPS
/// like the node plugin does, and uses its control plane to mint pod tokens and read counters.
pub mod azure {
    use std::io::{BufRead, BufReader};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    use super::HarnessError;

    pub struct EmulatorProcess {
        child: Child,
        pub base_url: String,
        /// Vault name to URL, as the emulator printed them.
        pub vaults: Vec<(String, String)>,
        pub ca_file: PathBuf,
        http: reqwest::Client,
    }

    fn other(what: impl Into<String>) -> HarnessError {
        HarnessError::Io {
            what: what.into(),
            source: std::io::Error::other("failed"),
        }
    }

    impl EmulatorProcess {
        /// Starts the emulator found next to `sealvol` (cargo builds both into one directory)
        /// with `config`, writing its files under `dir`.
        pub fn start(
            sealvol: &Path,
            dir: &Path,
            config: &serde_json::Value,
        ) -> Result<EmulatorProcess, HarnessError> {
            let binary = sealvol.with_file_name("sealvol-azure-emulator");
            if !binary.exists() {
                return Err(other(format!(
                    "{} is missing: build the workspace (cargo build --workspace)",
                    binary.display()
                )));
            }
            let config_file = dir.join("emulator-config.json");
            let ca_file = dir.join("emulator-ca.pem");
            std::fs::write(&config_file, config.to_string()).map_err(|e| HarnessError::Io {
                what: "writing the emulator config".into(),
                source: e,
            })?;
            let log =
                std::fs::File::create(dir.join("emulator.log")).map_err(|e| HarnessError::Io {
                    what: "emulator log".into(),
                    source: e,
                })?;
            let mut child = Command::new(&binary)
                .args(["serve", "--admin", "--config"])
                .arg(&config_file)
                .arg("--ca-out")
                .arg(&ca_file)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .map_err(|e| HarnessError::Io {
                    what: format!("starting {}", binary.display()),
                    source: e,
                })?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| other("emulator stdout"))?;
            let mut lines = BufReader::new(stdout).lines();
            let base_url = lines
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| other("the emulator printed no address"))?;
            let mut vaults = Vec::new();
            let count = config["vaults"].as_array().map(Vec::len).unwrap_or(0);
            for _ in 0..count {
                let line = lines
                    .next()
                    .and_then(Result::ok)
                    .ok_or_else(|| other("the emulator printed no vault"))?;
                let mut parts = line.split_whitespace().skip(1);
                if let (Some(name), Some(url)) = (parts.next(), parts.next()) {
                    vaults.push((name.to_string(), url.to_string()));
                }
            }
            let pem = std::fs::read(&ca_file).map_err(|e| HarnessError::Io {
                what: "emulator CA".into(),
                source: e,
            })?;
            let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| other(e.to_string()))?;
            let http = reqwest::Client::builder()
                .tls_certs_only([ca])
                .build()
                .map_err(|e| other(e.to_string()))?;
            Ok(EmulatorProcess {
                child,
                base_url,
                vaults,
                ca_file,
                http,
            })
        }

        pub fn vault_url(&self, name: &str) -> Option<&str> {
            self.vaults
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, u)| u.as_str())
        }

        /// The node plugin's flags for this emulator.
        pub fn node_args(&self, tenant: &str) -> Vec<String> {
            vec![
                format!("--authority-host={}", self.base_url),
                format!("--ca-file={}", self.ca_file.display()),
                format!("--tenant-id={tenant}"),
                "--keyvault-verify-challenge=false".to_string(),
                format!(
                    "--allowed-vault-hosts={}",
                    self.vaults
                        .iter()
                        .filter_map(|(_, url)| url.strip_prefix("https://"))
                        .map(|h| h.trim_end_matches('/'))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ]
        }

        /// A service-account token from fake issuer `issuer`, as kubelet receives it.
        pub async fn mint_token(
            &self,
            issuer: &str,
            namespace: &str,
            service_account: &str,
        ) -> Result<String, HarnessError> {
            let body =
                serde_json::json!({"namespace": namespace, "service_account": service_account});
            let v: serde_json::Value = self
                .http
                .post(format!(
                    "{}/_emulator/issuers/{issuer}/token",
                    self.base_url
                ))
                .json(&body)
                .send()
                .await
                .map_err(|e| other(e.to_string()))?
                .json()
                .await
                .map_err(|e| other(e.to_string()))?;
            v["token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| other("no token minted"))
        }

        /// Adds (`assign`) or deletes a role assignment through the control plane.
        pub async fn set_role(
            &self,
            principal: &str,
            role: &str,
            scope: &str,
            assign: bool,
        ) -> Result<(), HarnessError> {
            let body = serde_json::json!({"principal": principal, "role": role, "scope": scope});
            let url = format!("{}/_emulator/role-assignments", self.base_url);
            let req = if assign {
                self.http.post(url)
            } else {
                self.http.delete(url)
            };
            let resp = req
                .json(&body)
                .send()
                .await
                .map_err(|e| other(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(other(format!("role assignment: HTTP {}", resp.status())));
            }
            Ok(())
        }

        /// Calls per route answered with `status` (every status when None).
        pub async fn count(&self, route: &str, status: Option<u16>) -> u64 {
            let Ok(resp) = self
                .http
                .get(format!("{}/_emulator/counters", self.base_url))
                .send()
                .await
            else {
                return 0;
            };
            let Ok(v) = resp.json::<serde_json::Value>().await else {
                return 0;
            };
            let Some(by_status) = v[route].as_object() else {
                return 0;
            };
            match status {
                Some(s) => by_status
                    .get(&s.to_string())
                    .and_then(|n| n.as_u64())
                    .unwrap_or(0),
                None => by_status.values().filter_map(|n| n.as_u64()).sum(),
            }
        }
    }

    impl Drop for EmulatorProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
