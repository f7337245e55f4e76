//! A node plugin in a scratch directory, driven as kubelet and the sidecars would drive it:
//! for `sealvol bench`, `sealvol demo` and the integration tests. It starts `sealvol node` as a
//! child process with a directory pool, a kubelet dir and a state dir under one temporary
//! directory, and on drop kills the child and removes every mount and loop device it left
//! under that directory, so a failed test or benchmark leaks nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::CsiClient;
use crate::sys::{self, AttachedLoop, FileId, LoopDevice, MountTable};

/// Where the scratch node keeps things, all below `root`.
pub struct ScratchNode {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub kubelet_dir: PathBuf,
    pub state_dir: PathBuf,
    pub pool_dir: PathBuf,
    pub log_file: PathBuf,
    pub node_id: String,
    /// The pool directory as the node plugin sees it (`pool_dir` unless containerized).
    pub plugin_pool_dir: PathBuf,
    binary: PathBuf,
    extra_args: Vec<String>,
    /// A command the node plugin is started through (its program and arguments follow).
    wrapper: Vec<String>,
    /// Mounts the harness made itself (containerized), removed last, newest first.
    infra_mounts: Vec<PathBuf>,
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
    #[error(
        "{0} needs the crash and pause points: build with `--features test-hooks` (hack/test does)"
    )]
    NoTestHooks(String),
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
            plugin_pool_dir: root.join("pool"),
            root,
            binary: binary.to_path_buf(),
            extra_args: Vec::new(),
            wrapper: Vec::new(),
            infra_mounts: Vec::new(),
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

    /// Runs every later start of the node plugin as a container would run it: in a mount
    /// namespace of its own, with the kubelet and state directories shared both ways (as
    /// `mountPropagation: Bidirectional` does) and the pool bind-mounted privately at another
    /// path (`plugin_pool_dir`), so the paths the kernel reports for its loop devices mean
    /// nothing outside it, and nothing once it is gone. The pool is a filesystem of its own
    /// (tmpfs of `pool_bytes`), so every loop device over it is this node's.
    /// Puts the pool on a filesystem of its own: a tmpfs of `pool_bytes`, which a test can
    /// fill from outside the driver.
    pub fn pool_on_tmpfs(mut self, pool_bytes: u64) -> Result<Self, HarnessError> {
        let size = format!("size={pool_bytes}");
        nix::mount::mount(
            Some("tmpfs"),
            &self.pool_dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(size.as_str()),
        )
        .map_err(|e| HarnessError::Io {
            what: format!("mount tmpfs at {}", self.pool_dir.display()),
            source: std::io::Error::from(e),
        })?;
        self.infra_mounts.push(self.pool_dir.clone());
        Ok(self)
    }

    pub fn containerized(mut self, pool_bytes: u64) -> Result<Self, HarnessError> {
        use nix::mount::{MsFlags, mount};
        let none = None::<&str>;
        let fail = |what: String| {
            move |e: nix::Error| HarnessError::Io {
                what,
                source: std::io::Error::from(e),
            }
        };
        let size = format!("size={pool_bytes}");
        mount(
            Some("tmpfs"),
            &self.pool_dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(size.as_str()),
        )
        .map_err(fail(format!("mount tmpfs at {}", self.pool_dir.display())))?;
        self.infra_mounts.push(self.pool_dir.clone());
        mount(none, &self.pool_dir, none, MsFlags::MS_PRIVATE, none)
            .map_err(fail("make the pool private".into()))?;
        for dir in [self.kubelet_dir.clone(), self.state_dir.clone()] {
            mount(Some(&dir), &dir, none, MsFlags::MS_BIND, none)
                .map_err(fail(format!("bind {}", dir.display())))?;
            self.infra_mounts.push(dir.clone());
            mount(none, &dir, none, MsFlags::MS_SHARED, none)
                .map_err(fail(format!("make {} shared", dir.display())))?;
        }
        // The plugin's view of the pool lives in a private mount, so binding the pool there
        // in the plugin's namespace propagates nowhere.
        let ns_dir = self.root.join("plugin-ns");
        std::fs::create_dir_all(&ns_dir).map_err(io("mkdir plugin-ns"))?;
        mount(
            Some("tmpfs"),
            &ns_dir,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .map_err(fail("mount tmpfs at plugin-ns".into()))?;
        self.infra_mounts.push(ns_dir.clone());
        mount(none, &ns_dir, none, MsFlags::MS_PRIVATE, none)
            .map_err(fail("make plugin-ns private".into()))?;
        self.plugin_pool_dir = ns_dir.join("pool");
        std::fs::create_dir_all(&self.plugin_pool_dir).map_err(io("mkdir plugin-ns/pool"))?;
        let script = format!(
            "mount --bind '{}' '{}' && exec \"$0\" \"$@\"",
            self.pool_dir.display(),
            self.plugin_pool_dir.display()
        );
        self.wrapper = [
            "unshare",
            "-m",
            "--propagation",
            "unchanged",
            "sh",
            "-c",
            &script,
        ]
        .map(String::from)
        .to_vec();
        Ok(self)
    }

    /// Starts `sealvol node` (with `env` added) and waits until its socket accepts
    /// connections.
    pub async fn start(&mut self, env: &[(&str, &str)]) -> Result<CsiClient, HarnessError> {
        if !cfg!(feature = "test-hooks")
            && let Some((hook, _)) = env
                .iter()
                .find(|(k, _)| *k == "SEALVOL_CRASH_AT" || *k == "SEALVOL_PAUSE_AT")
        {
            return Err(HarnessError::NoTestHooks((*hook).to_string()));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(io("opening the node log"))?;
        let log_err = log.try_clone().map_err(io("opening the node log"))?;
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        cmd.arg("node")
            .arg(format!("--endpoint=unix://{}", self.socket.display()))
            .arg(format!("--node-id={}", self.node_id))
            .arg(format!("--pool=default={}", self.plugin_pool_dir.display()))
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

    /// Mount points below the scratch directory (but for the harness's own).
    pub fn mounts(&self) -> Vec<PathBuf> {
        MountTable::read()
            .map(|t| {
                t.entries()
                    .iter()
                    .filter(|m| {
                        m.mount_point.starts_with(&self.root)
                            && !self.infra_mounts.contains(&m.mount_point)
                    })
                    .map(|m| m.mount_point.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Loop devices over files of this scratch node: by the label its node plugin gives them
    /// (which holds across mount namespaces and for removed files), by the backing file's
    /// identity (a file in the pool directory), or by the path the kernel reports. Never by
    /// filesystem alone: parallel tests share /tmp's.
    fn own_loops(&self) -> Vec<AttachedLoop> {
        let root = format!("{}/", self.root.display());
        // The label the node plugin gives its loop devices (volume::loop_owner).
        let owner_label = std::fs::read_to_string(self.state_dir.join("loop-owner"))
            .ok()
            .map(|o| format!("sealvol:{}", o.trim()));
        let pool_files: Vec<FileId> = std::fs::read_dir(&self.pool_dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| FileId::from_metadata(&m))
                    .collect()
            })
            .unwrap_or_default();
        sys::attached_loops()
            .unwrap_or_default()
            .into_iter()
            .filter(|l| {
                owner_label
                    .as_deref()
                    .is_some_and(|o| l.label.starts_with(o))
                    || l.backing_file.starts_with(&root)
                    || pool_files.contains(&l.backing)
            })
            .collect()
    }

    /// Loop devices whose backing file is this scratch node's.
    pub fn loop_devices(&self) -> Vec<String> {
        self.own_loops()
            .into_iter()
            .map(|l| l.device_path().display().to_string())
            .collect()
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

    /// A node reboot, as the driver sees one: the plugin is killed, and every mount and loop
    /// device of this node goes away (the pool's files stay). Start the plugin again after.
    pub fn reboot(&mut self) {
        self.kill();
        self.release_mounts_and_loops();
    }

    fn release_mounts_and_loops(&mut self) {
        let mut mounts = self.mounts();
        // Deepest (and most recent) first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            let _ = sys::unmount(&m, true);
        }
        for l in self.own_loops() {
            if let Ok(Some(dev)) = LoopDevice::open_bound_to(l.number, l.backing) {
                let _ = dev.detach();
            }
        }
    }

    fn cleanup(&mut self) {
        self.kill();
        self.release_mounts_and_loops();
        for m in std::mem::take(&mut self.infra_mounts).iter().rev() {
            let _ = sys::unmount(m, true);
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
        /// Storage account name to its Blob URL (`https://127.0.0.1:PORT/ACCOUNT`).
        pub blob_accounts: Vec<(String, String)>,
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
            let accounts = config["storage_accounts"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0);
            let mut command = Command::new(&binary);
            command
                .args(["serve", "--admin", "--config"])
                .arg(&config_file)
                .arg("--ca-out")
                .arg(&ca_file);
            if accounts > 0 {
                command.arg("--azurite").arg(azurite_binary()?);
            }
            let mut child = command
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
            // After the base URL: a line per vault, per Managed HSM, then per storage account.
            let count = |key: &str| config[key].as_array().map(Vec::len).unwrap_or(0);
            let (mut vaults, mut blob_accounts) = (Vec::new(), Vec::new());
            for _ in 0..count("vaults") + count("hsms") + accounts {
                let line = lines
                    .next()
                    .and_then(Result::ok)
                    .ok_or_else(|| other("the emulator printed fewer lines than it serves"))?;
                let mut parts = line.split_whitespace();
                if let (Some(kind), Some(name), Some(url)) =
                    (parts.next(), parts.next(), parts.next())
                {
                    let entry = (name.to_string(), url.to_string());
                    match kind {
                        "vault" => vaults.push(entry),
                        "blob" => blob_accounts.push(entry),
                        _ => {}
                    }
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
                blob_accounts,
                ca_file,
                http,
            })
        }

        /// The Blob URL of storage account `name` (`https://127.0.0.1:PORT/ACCOUNT`).
        pub fn blob_url(&self, name: &str) -> Option<&str> {
            self.blob_accounts
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, u)| u.as_str())
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

    /// Azurite's Blob service (for the emulator's `--azurite`): `$AZURITE_BLOB`, else
    /// `azurite-blob` on the PATH.
    pub fn azurite_binary() -> Result<PathBuf, HarnessError> {
        if let Some(p) = std::env::var_os("AZURITE_BLOB") {
            return Ok(PathBuf::from(p));
        }
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("azurite-blob"))
            .find(|p| p.exists())
            .ok_or_else(|| other("azurite-blob is not installed (npm install -g azurite@3.37.0)"))
    }

    impl Drop for EmulatorProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
