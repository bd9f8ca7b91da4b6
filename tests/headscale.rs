//! The control-plane checks against a REAL Headscale in Docker (testcontainers).
//!
//! Built only with `--features headscale`; without it the test is listed as ignored, so a count
//! of passed tests never includes it. With the feature it needs a Docker engine and fails when
//! none answers. `.github/workflows/headscale.yml` runs it on hosts with Docker. The REST calls
//! are the same ones nexus-sim's admin commands make, so this also checks that nexus-sim's API is
//! Headscale's.

#[cfg(feature = "headscale")]
fn docker_available() -> bool {
    std::process::Command::new("docker").arg("info").output().map(|o| o.status.success()).unwrap_or(false)
}

#[test]
#[cfg_attr(not(feature = "headscale"), ignore = "needs --features headscale and a Docker engine")]
fn real_headscale_control_plane() {
    #[cfg(not(feature = "headscale"))]
    panic!("built without `--features headscale`: nothing to run");
    #[cfg(feature = "headscale")]
    {
        assert!(docker_available(), "--features headscale is set but no Docker engine answers `docker info`");
        tokio::runtime::Runtime::new().unwrap().block_on(docker::run());
    }
}

#[cfg(feature = "headscale")]
mod docker {
    use citadel::mesh::{Config, ConnectError, Mesh};
    use citadel_e2e::eventually;
    use serde_json::{json, Value};
    use std::time::Duration;
    use testcontainers::core::{ExecCommand, IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    const IMAGE: &str = "headscale/headscale";
    const TAG: &str = "0.26.1";

    const CONFIG: &str = r#"
server_url: http://127.0.0.1:8080
listen_addr: 0.0.0.0:8080
metrics_listen_addr: 127.0.0.1:9090
noise:
  private_key_path: /var/lib/headscale/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: false
  urls:
    - https://controlplane.tailscale.com/derpmap/default
  auto_update_enabled: false
database:
  type: sqlite
  sqlite:
    path: /var/lib/headscale/db.sqlite
policy:
  mode: file
  path: /etc/headscale/acl.hujson
dns:
  magic_dns: false
  base_domain: mesh.test
  override_local_dns: false
unix_socket: /var/run/headscale/headscale.sock
unix_socket_permission: "0770"
"#;

    /// Orgs are Headscale users isolated by policy: each user reaches only itself.
    const POLICY: &str = r#"{"acls": [
  {"action": "accept", "src": ["acme@"], "dst": ["acme@:*"]},
  {"action": "accept", "src": ["globex@"], "dst": ["globex@:*"]}
]}"#;

    async fn api(
        http: &reqwest::Client,
        base: &str,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Value {
        let r = http.request(method, format!("{base}{path}")).bearer_auth(key).json(&body).send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    fn cfg(url: &str, key: Option<&str>, dir: &std::path::Path, host: &str) -> Config {
        let mut c = Config::new(Some(url.to_string()), key.map(str::to_string), dir.to_path_buf());
        c.hostname = Some(host.to_string());
        c.timeout = Duration::from_secs(15);
        c
    }

    pub async fn run() {
        let container = GenericImage::new(IMAGE, TAG)
            .with_exposed_port(8080.tcp())
            .with_wait_for(WaitFor::Nothing)
            .with_copy_to("/etc/headscale/config.yaml", CONFIG.as_bytes().to_vec())
            .with_copy_to("/etc/headscale/acl.hujson", POLICY.as_bytes().to_vec())
            .with_cmd(["serve"])
            .start()
            .await
            .expect("start the Headscale container");
        let port = container.get_host_port_ipv4(8080).await.unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        assert!(
            eventually(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await,
            "Headscale never listened"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The image's binary path differs between releases; try both.
        let mut api_key = String::new();
        for bin in ["headscale", "/ko-app/headscale"] {
            if let Ok(mut r) = container.exec(ExecCommand::new([bin, "apikeys", "create"])).await {
                let out = String::from_utf8_lossy(&r.stdout_to_vec().await.unwrap_or_default()).trim().to_string();
                if let Some(k) = out.lines().last().filter(|l| !l.is_empty()) {
                    api_key = k.to_string();
                    break;
                }
            }
        }
        assert!(!api_key.is_empty(), "could not create a Headscale API key");

        let mut keys = Vec::new();
        for org in ["acme", "globex"] {
            let u = api(&http, &base, &api_key, reqwest::Method::POST, "/api/v1/user", json!({"name": org})).await;
            let id = u["user"]["id"].clone();
            let exp = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
            let k = api(
                &http,
                &base,
                &api_key,
                reqwest::Method::POST,
                "/api/v1/preauthkey",
                json!({"user": id, "reusable": true, "expiration": exp}),
            )
            .await;
            keys.push(k["preAuthKey"]["key"].as_str().unwrap().to_string());
        }

        let t = tempfile::tempdir().unwrap();
        let a1 = Mesh::connect(cfg(&base, Some(&keys[0]), &t.path().join("a1"), "a1")).await.unwrap();
        let a2 = Mesh::connect(cfg(&base, Some(&keys[0]), &t.path().join("a2"), "a2")).await.unwrap();
        let g1 = Mesh::connect(cfg(&base, Some(&keys[1]), &t.path().join("g1"), "g1")).await.unwrap();
        let names = |m: &Mesh| m.status().peers.into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert!(eventually(Duration::from_secs(20), || names(&a1) == ["a2"] && names(&a2) == ["a1"]).await);
        assert!(names(&g1).is_empty(), "globex sees acme: {:?}", g1.status());
        assert_eq!(a1.status().org, "acme");

        // Restart from state: same IP, no key.
        let ip = a1.status().ipv4;
        drop(a1);
        let a1 = Mesh::connect(cfg(&base, None, &t.path().join("a1"), "a1")).await.unwrap();
        assert_eq!(a1.status().ipv4, ip);

        // Wrong key: a clear error, not a hang.
        let e = Mesh::connect(cfg(&base, Some("not-a-key"), &t.path().join("x"), "x")).await.err().unwrap();
        assert!(matches!(e, ConnectError::AuthRejected(_) | ConnectError::Control(_)), "{e}");

        // Logout: Headscale removes the node from the peer's map or marks it expired.
        a2.logout().await.unwrap();
        let gone = || a1.status().peers.iter().all(|p| p.expired || p.online == Some(false));
        assert!(eventually(Duration::from_secs(20), gone).await, "{:?}", a1.status());
    }
}
