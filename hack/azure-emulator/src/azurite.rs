//! Azurite (Microsoft's Azure Storage emulator, npm package `azurite`) as a child process that
//! stores the blobs of the configured storage accounts: its Blob service over HTTPS with a
//! certificate of the emulator's CA, on a port of its choosing on 127.0.0.1, in basic OAuth
//! mode, its data in a temporary directory. Azurite decodes bearer tokens without verifying
//! them and checks no roles, so only the Blob gateway (`blob`) talks to it. The process is
//! killed and waited for when this is dropped, and (Linux) by the kernel when the emulator's
//! process dies without unwinding, so no node process outlives a test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::StorageAccountConfig;
use crate::tls::Tls;

/// How to install the Azurite version the emulator is tested with.
pub const INSTALL_HINT: &str = "npm install -g azurite@3.37.0";
/// The Blob REST API version of the emulator's own calls (Azurite runs with
/// `--skipApiVersionCheck`, so clients may send newer ones).
pub const API_VERSION: &str = "2026-04-06";
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Azurite prints this, then its URL, once it listens (it picks the port: `--blobPort 0`).
const LISTENING: &str = "successfully listens on ";

pub struct Azurite {
    /// `https://127.0.0.1:PORT`; URLs are path-style, `/{account}/{container}/{blob}`.
    pub url: String,
    /// Dropping it tells the keeper thread to kill the process.
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<JoinHandle<()>>,
    log: PathBuf,
    // Removed after the process is gone (Drop joins the keeper before the fields drop).
    _dir: tempfile::TempDir,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
    }
}

/// Spawns `cmd` from a thread of its own that owns the child until it exits or `stop` is
/// dropped (then kills and reaps it). The kernel's parent-death signal is tied to the thread
/// that spawned the child, so this thread lives exactly as long as the child should: the
/// signal fires only if the whole process dies.
fn spawn_kept(mut cmd: Command) -> Result<(mpsc::Sender<()>, JoinHandle<()>), String> {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel();
    let keeper = std::thread::Builder::new()
        .name("azurite".into())
        .spawn(move || {
            die_with_parent(&mut cmd);
            let mut child: Child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = started_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = started_tx.send(Ok(()));
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                match stop_rx.recv_timeout(Duration::from_millis(100)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => break,
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        })
        .map_err(|e| e.to_string())?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok((stop_tx, keeper)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the Azurite keeper thread died".to_string()),
    }
}

impl Azurite {
    /// Starts `binary` (`azurite-blob`) serving `accounts`, trusted through `tls`'s CA, and
    /// waits until it answers HTTPS. `http` must trust that CA.
    pub async fn start(
        binary: &Path,
        tls: &Tls,
        accounts: &[StorageAccountConfig],
        http: &reqwest::Client,
    ) -> Result<Azurite, String> {
        let dir = tempfile::Builder::new()
            .prefix("sealvol-azurite-")
            .tempdir()
            .map_err(|e| format!("temporary directory for Azurite: {e}"))?;
        let (cert, key) = tls.issue_server_cert()?;
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok::<_, String>(path)
        };
        let cert_path = write("cert.pem", &cert)?;
        let key_path = write("key.pem", &key)?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let log = dir.path().join("azurite.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        // Azurite knows only devstoreaccount1 unless told otherwise. The keys are random:
        // nobody signs with them, requests reach Azurite with bearer tokens only.
        let account_keys: Vec<String> = accounts
            .iter()
            .map(|a| {
                format!(
                    "{}:{}",
                    a.name,
                    crate::crypto::b64(&crate::crypto::random_bytes(64))
                )
            })
            .collect();
        let mut cmd = Command::new(binary);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", "0", "--location"])
            .arg(&data)
            .arg("--cert")
            .arg(&cert_path)
            .arg("--key")
            .arg(&key_path)
            .args([
                "--oauth",
                "basic",
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
                "--disableTelemetry",
            ])
            .env("AZURITE_ACCOUNTS", account_keys.join(";"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let (stop, keeper) = spawn_kept(cmd).map_err(|e| {
            format!(
                "start {}: {e} (Azurite's azurite-blob; install it with `{INSTALL_HINT}`)",
                binary.display()
            )
        })?;
        let mut azurite = Azurite {
            url: String::new(),
            stop: Some(stop),
            keeper: Some(keeper),
            log,
            _dir: dir,
        };
        azurite.url = azurite.wait_until_answering(http).await?;
        Ok(azurite)
    }

    /// Waits for Azurite's URL in its log, then for an HTTPS answer (any status) there.
    async fn wait_until_answering(&mut self, http: &reqwest::Client) -> Result<String, String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = String::from("it printed no URL");
        while Instant::now() < deadline {
            if self.keeper.as_ref().is_none_or(|k| k.is_finished()) {
                return Err(format!(
                    "azurite-blob exited before it answered; the end of its log:\n{}",
                    self.log_tail()
                ));
            }
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(url) = text
                .split_once(LISTENING)
                .and_then(|(_, rest)| rest.split_whitespace().next())
            {
                match http.get(url).send().await {
                    Ok(_) => return Ok(url.trim_end_matches('/').to_string()),
                    Err(e) => last_error = format!("GET {url}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "azurite-blob did not answer within {} s ({last_error}); the end of its log:\n{}",
            START_TIMEOUT.as_secs(),
            self.log_tail()
        ))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Creates `container` in `account` with `token` (a storage token Azurite takes).
    pub async fn create_container(
        &self,
        http: &reqwest::Client,
        token: &str,
        account: &str,
        container: &str,
    ) -> Result<(), String> {
        let url = format!("{}/{account}/{container}?restype=container", self.url);
        let response = http
            .put(&url)
            .bearer_auth(token)
            .header("x-ms-version", API_VERSION)
            .header("content-length", "0")
            .send()
            .await
            .map_err(|e| format!("create container {account}/{container} in Azurite: {e}"))?;
        let status = response.status();
        // 409: it exists already (ContainerAlreadyExists).
        if status.is_success() || status.as_u16() == 409 {
            return Ok(());
        }
        Err(format!(
            "create container {account}/{container} in Azurite: HTTP {status}: {}",
            response.text().await.unwrap_or_default()
        ))
    }
}

/// Asks the kernel to kill the child when the thread that spawned it ends: a test binary
/// killed outright (no unwinding, no Drop) then leaves no node process behind.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
    // is async-signal-safe and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_: &mut Command) {}
