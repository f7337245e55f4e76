//! The binary as an operator runs it: `serve` prints its addresses and writes the CA;
//! `mint-token` asks it for a service-account token through the control plane.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_and_mint_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let log = dir.path().join("emulator.log");
    let bin = env!("CARGO_BIN_EXE_sealvol-azure-emulator");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/example-config.yaml");
    let mut child = Killed(
        Command::new(bin)
            .args([
                "serve",
                "--admin",
                "--listen",
                "127.0.0.1:0",
                "--config",
                config,
                "--ca-out",
            ])
            .arg(&ca)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let base = lines.next().unwrap().unwrap();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let vault = lines.next().unwrap().unwrap();
    assert!(vault.starts_with("vault kv1 https://127.0.0.1:"), "{vault}");
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    let out = Command::new(bin)
        .args(["mint-token", "--emulator", &base, "--ca"])
        .arg(&ca)
        .args(["--namespace", "default", "--service-account", "app"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let (_, claims) = sealvol_azure_emulator::crypto::peek_jwt(token.trim()).unwrap();
    assert_eq!(claims["sub"], "system:serviceaccount:default:app");
    assert_eq!(claims["iss"], format!("{base}/issuers/cluster"));

    // One line per request, naming the route; the token itself never appears.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("route=\"admin\""), "{text}");
    let signature = token.trim().rsplit('.').next().unwrap();
    assert!(!text.contains(signature), "a token reached the log");
}
