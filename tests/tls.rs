//! Trust: citadel and nexus-sim over https with a test CA (control, REST admin, DERP), the
//! pinned server key refusing an impostor, the clear errors for an untrusted certificate or a
//! wrong host name, DERP certificate checks, and plain http still working.

use citadel::derphttp::{DerpClient, Received};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::mesh::{Config, Mesh};
use citadel::net::TokioNet;
use citadel_e2e::{bin, eventually, free_port, run_with_deadline, Nexus};
use nexus_sim::tls::TestPki;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

/// A fresh test CA and server certificate for `names`, written to a temporary directory.
fn mint(names: &[&str]) -> (tempfile::TempDir, TestPki) {
    let pki = nexus_sim::tls::mint(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path()).unwrap();
    (dir, pki)
}

/// nexus-sim serving `pki`'s certificate on 127.0.0.1:`port`, known to clients as `host`.
/// Retries the bind for a moment: a server just dropped on the same port lets go of its
/// listener asynchronously.
async fn tls_nexus(pki: &TestPki, port: u16, host: &str) -> Nexus {
    tls_nexus_with(pki, port, host, None).await
}

/// [`tls_nexus`] whose node keys expire `node_key_expiry` after registration or renewal.
async fn tls_nexus_with(pki: &TestPki, port: u16, host: &str, node_key_expiry: Option<Duration>) -> Nexus {
    let start = Instant::now();
    loop {
        let cfg = nexus_sim::Config {
            node_key_expiry,
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            server_url: format!("https://{host}:{port}"),
            tls: Some(pki.server_config().unwrap()),
            // The relay checks below log in with fresh keys: this file tests TLS, not the
            // relay's client verification (tests/derp.rs does).
            derp_verify_clients: false,
            ..Default::default()
        };
        match nexus_sim::start(cfg).await {
            Ok(running) => return Nexus { running },
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("nexus-sim on port {port}: {e}"),
        }
    }
}

/// Runs the citadel CLI (no ambient CA variables) without blocking the runtime.
async fn citadel(args: Vec<String>) -> (Output, Duration) {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut c = Command::new(bin("citadel"));
        c.args(&args).env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR").env("CITADEL_LOG", "warn");
        let o = run_with_deadline(&mut c, Duration::from_secs(30));
        (o, start.elapsed())
    })
    .await
    .unwrap()
}

fn init_args(state: &Path, url: &str, key: Option<&str>, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["--state-dir".into(), state.display().to_string(), "--timeout".into(), "5".into()];
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend(["init".into(), "--nexus".into(), url.into(), "--hostname".into(), "n1".into()]);
    if let Some(k) = key {
        a.extend(["--authkey".into(), k.into()]);
    }
    a
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn node_cfg(url: &str, key: &str, dir: PathBuf, host: &str) -> Config {
    let mut c = Config::new(Some(url.to_string()), Some(key.to_string()), dir);
    c.hostname = Some(host.to_string());
    c.timeout = Duration::from_secs(5);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_over_https_with_a_test_ca_register_map_relay_and_reach_each_other() {
    let (ca_dir, pki) = mint(&["localhost"]);
    citadel::tls::add_ca_file(&ca_dir.path().join("ca.pem")).unwrap();
    let port = free_port();
    let nx = tls_nexus(&pki, port, "localhost").await;
    let url = format!("https://localhost:{port}");
    assert_eq!(nx.url(), url);

    // The DERP map names the host (no IP literal, so citadel resolves it) and asks for checks.
    let node = nx.running.shared.derp_map.regions[&1].nodes[0].clone();
    assert_eq!((node.host_name.as_str(), node.ipv4.as_str(), node.insecure_for_tests), ("localhost", "", false));

    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let a = Mesh::connect(node_cfg(&url, &key, t.path().join("a"), "a")).await.expect("a joins over https");
    let b = Mesh::connect(node_cfg(&url, &key, t.path().join("b"), "b")).await.expect("b joins over https");
    assert!(eventually(T, || a.resolve("b").is_some()).await, "a never saw b in its map");

    // Data through the mesh.
    citadel_e2e::serve_echo(b.listen_tcp(7000).unwrap());
    let ip = a.resolve("b").unwrap();
    let mut s = tokio::time::timeout(T, a.dial_tcp((ip, 7000).into())).await.unwrap().unwrap();
    let got = tokio::time::timeout(T, citadel_e2e::echo_through(&mut s, b"over a verified control plane"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"over a verified control plane");

    // The relay: two clients log in to the map's node over verified TLS and exchange packets.
    let (ak, bk) = (PrivateKey::generate(&mut rand::thread_rng()), PrivateKey::generate(&mut rand::thread_rng()));
    let ra = DerpClient::connect(&TokioNet, node.clone(), &ak, T).await.expect("DERP over verified TLS");
    let rb = DerpClient::connect(&TokioNet, node, &bk, T).await.expect("DERP over verified TLS");
    ra.send(NodePublic(bk.public_bytes()), b"relayed").await.unwrap();
    let got = tokio::time::timeout(T, async {
        loop {
            if let Received::Packet { src, packet } = rb.recv().await.unwrap() {
                return (src, packet);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, (NodePublic(ak.public_bytes()), b"relayed".to_vec()));

    // The admin CLI speaks https too, trusting the CA through SSL_CERT_FILE.
    let ca = ca_dir.path().join("ca.pem");
    let url2 = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut c = Command::new(bin("nexus-sim"));
        c.args(["users", "list", "-o", "json"]).env("NEXUS_URL", &url2).env("NEXUS_API_KEY", "wrong-key");
        c.env("SSL_CERT_FILE", &ca);
        let trusted = run_with_deadline(&mut c, T);
        let mut c = Command::new(bin("nexus-sim"));
        c.args(["users", "list"]).env("NEXUS_URL", &url2).env("NEXUS_API_KEY", "wrong-key").env_remove("SSL_CERT_FILE");
        (trusted, run_with_deadline(&mut c, T))
    })
    .await
    .unwrap();
    // With the CA the request reaches the server (which refuses the made-up API key).
    assert!(stderr(&out.0).contains("401"), "{}", stderr(&out.0));
    assert!(stderr(&out.1).to_lowercase().contains("certificate"), "{}", stderr(&out.1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_still_works_and_pins_the_server_key() {
    let nx = Nexus::start_plain_with(nexus_sim::Config::default()).await;
    assert!(nx.url().starts_with("http://"));
    let key = nx.key("acme", false);
    let t = tempfile::tempdir().unwrap();
    let (o, _) = citadel(init_args(t.path(), &nx.url(), Some(&key), &[])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(t.path().join("node.json")).unwrap()).unwrap();
    assert_eq!(
        info["server_key"].as_str(),
        Some(citadel::keys::MachinePublic(nx.running.shared.server_key.public_bytes()).to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_with_another_server_key_is_refused_before_any_request() {
    let (ca_dir, pki) = mint(&["localhost"]);
    let ca = ca_dir.path().join("ca.pem").display().to_string();
    let port = free_port();
    let url = format!("https://localhost:{port}");
    let t = tempfile::tempdir().unwrap();

    let real = tls_nexus(&pki, port, "localhost").await;
    let key = real.key("acme", true);
    let (o, _) = citadel(init_args(t.path(), &url, Some(&key), &["--ca-file", &ca])).await;
    assert!(o.status.success(), "registering with the real Nexus: {}", stderr(&o));
    drop(real);

    // Same URL, same (valid) certificate, another server key: an impostor that got a
    // certificate for the name, or a restored server that lost its key.
    let impostor = tls_nexus(&pki, port, "localhost").await;
    let key2 = impostor.key("acme", true);
    for authkey in [None, Some(key2.as_str())] {
        let (o, _) = citadel(init_args(t.path(), &url, authkey, &["--ca-file", &ca])).await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(4), "{err}");
        assert!(err.contains("server key changed") && err.contains("--retrust-server-key"), "{err}");
    }
    assert_eq!(impostor.running.shared.faults.register_requests(), 0, "the impostor received a RegisterRequest");
    assert!(impostor.running.shared.store.nodes(None).is_empty());

    // Re-trusting deliberately works.
    let (o, _) = citadel(init_args(t.path(), &url, Some(&key2), &["--ca-file", &ca, "--retrust-server-key"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(impostor.running.shared.store.nodes(None).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_key_is_not_sent_again_on_reconnect() {
    let nx = Nexus::start().await;
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let m = Mesh::connect(node_cfg(&nx.url(), &key, t.path().join("a"), "a")).await.unwrap();
    let st = &nx.running.shared.store;
    let id = st.nodes(None)[0].id;
    // The admin removes the node; the stream drops and the node reconnects. A node that kept
    // the (reusable) key would silently register again.
    st.delete_node(id).unwrap();
    let before = nx.running.shared.faults.register_requests();
    nx.running.shared.faults.drop_streams();
    assert!(eventually(T, || nx.running.shared.faults.register_requests() > before).await, "no reconnect");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(st.nodes(None).is_empty(), "the node re-registered with its stored auth key");
    assert!(!m.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_and_wrong_host_names_fail_fast_and_clearly() {
    let (ca_dir, pki) = mint(&["localhost"]);
    let port = free_port();
    let nx = tls_nexus(&pki, port, "localhost").await;
    let key = nx.key("acme", false);
    let t = tempfile::tempdir().unwrap();

    let (o, took) =
        citadel(init_args(&t.path().join("a"), &format!("https://localhost:{port}"), Some(&key), &[])).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("not trusted") && err.contains("localhost") && err.contains("--ca-file"), "{err}");
    assert!(took < Duration::from_secs(4), "took {took:?}");

    // Trusted CA, but the certificate names "localhost", not 127.0.0.1.
    let ca = ca_dir.path().join("ca.pem").display().to_string();
    let (o, took) =
        citadel(init_args(&t.path().join("b"), &format!("https://127.0.0.1:{port}"), Some(&key), &["--ca-file", &ca]))
            .await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("not valid for the name") && err.contains("127.0.0.1"), "{err}");
    assert!(took < Duration::from_secs(4), "took {took:?}");

    // A CA file that is not one is a command-line error.
    let (o, _) =
        citadel(init_args(&t.path().join("c"), &nx.url(), Some(&key), &["--ca-file", "/nonexistent.pem"])).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(nx.running.shared.store.nodes(None).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derp_with_a_bad_certificate_is_refused_unless_opted_in() {
    // nexus-sim without --tls-cert: self-signed DERP, nodes marked InsecureForTests. The probe
    // logs in with a fresh key, so the relay does not verify clients here.
    let nx = Nexus::start_plain_with(nexus_sim::Config { derp_verify_clients: false, ..Default::default() }).await;
    let node = nx.running.shared.derp_map.regions[&1].nodes[0].clone();
    assert!(node.insecure_for_tests);
    let probe = |node: citadel::tailcfg::DerpNode, opt_in: bool| {
        tokio::task::spawn_blocking(move || {
            let mut c = Command::new(bin("derp-probe"));
            c.arg(serde_json::to_string(&node).unwrap()).env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
            if opt_in {
                c.env("CITADEL_DERP_INSECURE", "1");
            } else {
                c.env_remove("CITADEL_DERP_INSECURE");
            }
            let o = run_with_deadline(&mut c, T);
            (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
        })
    };
    let (ok, out) = probe(node.clone(), false).await.unwrap();
    assert!(!ok && out.contains("not trusted"), "{out}");
    let (ok, out) = probe(node.clone(), true).await.unwrap();
    assert!(ok, "{out}");

    // The opt-in covers InsecureForTests nodes only: a node that asks for checks gets them.
    let mut strict = node;
    strict.insecure_for_tests = false;
    let (ok, out) = probe(strict, true).await.unwrap();
    assert!(!ok && out.contains("not trusted"), "{out}");
}

/// A `mesh-node` child answering one JSON line per command.
struct MeshNode {
    _proc: citadel_e2e::Proc,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl MeshNode {
    fn ask(&mut self, cmd: &str) -> serde_json::Value {
        use std::io::{BufRead, Write};
        if !cmd.is_empty() {
            writeln!(self.stdin, "{cmd}").unwrap();
            self.stdin.flush().unwrap();
        }
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("mesh-node output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("mesh-node said {line:?}: {e}"))
    }
}

fn log_tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// The real Tailscale client (Caddy with tsnet) and a citadel node join an https nexus-sim
/// whose certificate comes from a test CA that both trust through `SSL_CERT_FILE` alone (no
/// InsecureForTests anywhere, DERP opt-in removed): direct fetch, then with UDP between them
/// dropped, a fetch relayed over DERP with verified TLS.
#[test]
fn real_tsnet_and_citadel_over_https_direct_and_relayed() {
    let Some(caddy) = citadel_e2e::real_peers("real tsnet over https") else { return };
    const CADDY_UDP: u16 = 41651;
    const CITADEL_UDP: u16 = 41710;
    let ns = citadel_e2e::Netns::new(&format!("cit-tls-{}", std::process::id()), "10.206.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    // The suite's test CA, which names localhost.
    let ca = citadel_e2e::test_ca().ca_file();
    let port = 18390;
    let url = format!("https://localhost:{port}");
    let nexus_log = tmp.path().join("nexus.log");
    let nx = citadel_e2e::NsNexus::start(&ns, port, &["--server-url", &url], Some(&nexus_log));
    nx.admin(&["users", "create", "acme"]);
    let authkey = nx.admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);

    let node_log = tmp.path().join("citadel.log");
    let mut child = ns
        .cmd(bin("mesh-node"))
        .arg(&url)
        .arg(&authkey)
        .arg(tmp.path().join("citadel-state"))
        .args(["citadel-node", &CITADEL_UDP.to_string(), "8080"])
        .env("SSL_CERT_FILE", &ca)
        .env_remove("SSL_CERT_DIR")
        .env_remove("CITADEL_DERP_INSECURE")
        .env("CITADEL_LOG", "citadel=debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&node_log).unwrap())
        .spawn()
        .expect("spawn mesh-node");
    let stdin = child.stdin.take().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut node = MeshNode { _proc: citadel_e2e::Proc(child), stdin, stdout };
    let up = node.ask("");
    assert!(up["ipv4"].is_string(), "citadel did not join over https: {up}\n{}", log_tail(&node_log));

    let options = format!("\t\ttls-caddy {{\n\t\t\tport {CADDY_UDP}\n\t\t}}");
    let caddy_dir = tmp.path().join("caddy");
    let _caddy = citadel_e2e::start_caddy_env(
        &ns,
        &caddy,
        &caddy_dir,
        &url,
        &authkey,
        "tls-caddy",
        &options,
        "",
        &[("SSL_CERT_FILE", ca.as_os_str())],
    );
    let fail = |what: &str, r: &serde_json::Value| -> ! {
        panic!(
            "{what}: {r}\n--- citadel ---\n{}\n--- caddy ---\n{}\n--- nexus-sim ---\n{}",
            log_tail(&node_log),
            log_tail(&caddy_dir.join("caddy.log")),
            log_tail(&nexus_log)
        )
    };
    let get_until = |node: &mut MeshNode, want: &str, limit: Duration| {
        let start = Instant::now();
        loop {
            let r = node.ask("get tls-caddy 80");
            if r["ok"] == true && r["path"].as_str().unwrap_or_default().starts_with(want) {
                return Ok(r);
            }
            if start.elapsed() > limit {
                return Err(r);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let r = get_until(&mut node, "", Duration::from_secs(90)).unwrap_or_else(|r| fail("no fetch from tsnet", &r));
    assert!(r["body"].as_str().unwrap_or_default().contains("real tsnet"), "{r}");
    println!("fetch over https-registered mesh: {r}");

    for (s, d) in [(CADDY_UDP, CITADEL_UDP), (CITADEL_UDP, CADDY_UDP)] {
        let o = ns
            .cmd("iptables")
            .args(["-A", "OUTPUT", "-p", "udp", "--sport", &s.to_string(), "--dport", &d.to_string(), "-j", "DROP"])
            .output()
            .unwrap();
        assert!(o.status.success(), "iptables: {}", String::from_utf8_lossy(&o.stderr));
    }
    let r = get_until(&mut node, "relay", Duration::from_secs(60))
        .unwrap_or_else(|r| fail("no fetch over verified DERP with UDP blocked", &r));
    println!("relayed over verified DERP: {r}");
}

/// `citadel init` wall time (process start to exit, fresh state each run) over https with a
/// test CA and over plain http, same run, median of 7 each, interleaved. Prints the figures;
/// `cargo test -p citadel-e2e --test tls init_time -- --nocapture` shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_time_over_https_vs_http() {
    // An IP-literal URL, as the http server has, so both DERP maps (and so the STUN probes
    // `init` waits for) are alike and only the transport differs.
    let (ca_dir, pki) = mint(&["127.0.0.1"]);
    let ca = ca_dir.path().join("ca.pem").display().to_string();
    let port = free_port();
    let https = tls_nexus(&pki, port, "127.0.0.1").await;
    let http = Nexus::start_plain_with(nexus_sim::Config::default()).await;
    let (hk, pk) = (https.key("bench", true), http.key("bench", true));
    let t = tempfile::tempdir().unwrap();
    let (mut ts, mut ps) = (vec![], vec![]);
    for i in 0..7 {
        let (o, d) =
            citadel(init_args(&t.path().join(format!("s{i}")), &https.url(), Some(&hk), &["--ca-file", &ca])).await;
        assert!(o.status.success(), "{}", stderr(&o));
        ts.push(d);
        let (o, d) = citadel(init_args(&t.path().join(format!("p{i}")), &http.url(), Some(&pk), &[])).await;
        assert!(o.status.success(), "{}", stderr(&o));
        ps.push(d);
    }
    ts.sort();
    ps.sort();
    let (s, p) = (ts[3], ps[3]);
    println!(
        "citadel init median of 7: https {:.1} ms, http {:.1} ms, ratio https/http {:.2}",
        s.as_secs_f64() * 1e3,
        p.as_secs_f64() * 1e3,
        s.as_secs_f64() / p.as_secs_f64()
    );
}

/// Control and DERP reach an https nexus-sim only through a real HTTP CONNECT proxy
/// (tinyproxy): inside a namespace, root's direct TCP to the server is rejected by iptables and
/// only tinyproxy's user may connect. `HTTPS_PROXY` makes `citadel init` and a DERP login work;
/// without it they fail.
#[test]
fn control_and_derp_through_an_https_proxy() {
    if !citadel_e2e::can_netns() || Command::new("tinyproxy").arg("-v").output().is_err() {
        assert!(std::env::var_os("CITADEL_REQUIRE_REAL").is_none(), "root and tinyproxy are required");
        println!("skipping: needs root and tinyproxy (apt-get install tinyproxy)");
        return;
    }
    let ns = citadel_e2e::Netns::new(&format!("cit-px-{}", std::process::id()), "10.207.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let (pki_dir, _pki) = mint(&["10.207.0.1"]);
    let ca = pki_dir.path().join("ca.pem");
    let port: u16 = 18490;
    let url = format!("https://10.207.0.1:{port}");
    let _nexus = citadel_e2e::Proc(
        ns.cmd(bin("nexus-sim"))
            .args([
                "serve",
                "--listen",
                &format!("10.207.0.1:{port}"),
                "--api-key",
                "px-admin",
                "--no-derp-verify-clients",
            ])
            .arg("--tls-cert")
            .arg(pki_dir.path().join("cert.pem"))
            .arg("--tls-key")
            .arg(pki_dir.path().join("key.pem"))
            .env("NEXUS_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = |args: &[&str]| -> String {
        let start = Instant::now();
        loop {
            let mut c = ns.cmd(bin("nexus-sim"));
            c.args(args).env("NEXUS_URL", &url).env("NEXUS_API_KEY", "px-admin").env("SSL_CERT_FILE", &ca);
            let o = run_with_deadline(&mut c, T);
            if o.status.success() {
                return String::from_utf8_lossy(&o.stdout).trim().to_string();
            }
            assert!(start.elapsed() < T, "{args:?}: {}", stderr(&o));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    admin(&["users", "create", "acme"]);
    let key = admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);

    let conf = tmp.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort 18888\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\nAllow 127.0.0.1\nConnectPort {port}\n"
        ),
    )
    .unwrap();
    let _proxy = citadel_e2e::Proc(
        ns.cmd("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Only the proxy's user may reach the server.
    let o = ns
        .cmd("iptables")
        .args(["-A", "OUTPUT", "-p", "tcp", "-d", "10.207.0.1", "--dport", &port.to_string()])
        .args(["-m", "owner", "--uid-owner", "0", "-j", "REJECT", "--reject-with", "tcp-reset"])
        .output()
        .unwrap();
    assert!(o.status.success(), "iptables: {}", String::from_utf8_lossy(&o.stderr));

    let run = |args: Vec<String>, proxy: bool, program: &str| {
        let mut c = ns.cmd(bin(program));
        c.args(&args).env("SSL_CERT_FILE", &ca).env_remove("CITADEL_DERP_INSECURE");
        for v in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"] {
            c.env_remove(v);
        }
        if proxy {
            c.env("HTTPS_PROXY", "http://127.0.0.1:18888");
        }
        run_with_deadline(&mut c, Duration::from_secs(30))
    };
    let state = tmp.path().join("node");
    let o = run(init_args(&state, &url, Some(&key), &[]), false, "citadel");
    assert_eq!(o.status.code(), Some(4), "direct access should be blocked: {}", stderr(&o));
    let start = Instant::now();
    let o = loop {
        // tinyproxy may still be starting.
        let o = run(init_args(&state, &url, Some(&key), &[]), true, "citadel");
        if o.status.success() || start.elapsed() > T {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(o.status.success(), "init through the proxy: {}", stderr(&o));

    let node = citadel::tailcfg::DerpNode {
        name: "1a".into(),
        region_id: 1,
        host_name: "10.207.0.1".into(),
        ipv4: "10.207.0.1".into(),
        derp_port: i32::from(port),
        ..Default::default()
    };
    let json = serde_json::to_string(&node).unwrap();
    let o = run(vec![json.clone()], false, "derp-probe");
    assert!(!o.status.success(), "DERP reached the server without the proxy");
    let o = run(vec![json], true, "derp-probe");
    assert!(o.status.success(), "DERP through the proxy: {}", String::from_utf8_lossy(&o.stdout));
}

/// Writes `data` on a connection to an echo server and reads the same number of bytes back,
/// leaving the connection open.
async fn echo_line<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    data: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(data).await?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).await?;
    Ok(got)
}

/// Renewal as a user sees it: with 6-second node keys, both nodes renew theirs while online,
/// again and again; a TCP connection opened before keeps working across the renewals, the mesh
/// IPs stay, the peer learns the new key, and the server never sees a key expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_key_near_expiry_is_renewed_online_keeping_ip_and_connections() {
    let (ca_dir, pki) = mint(&["localhost"]);
    citadel::tls::add_ca_file(&ca_dir.path().join("ca.pem")).unwrap();
    let port = free_port();
    let nx = tls_nexus_with(&pki, port, "localhost", Some(Duration::from_secs(6))).await;
    let url = format!("https://localhost:{port}");
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let a = Mesh::connect(node_cfg(&url, &key, t.path().join("a"), "a")).await.expect("a joins");
    let b = Mesh::connect(node_cfg(&url, &key, t.path().join("b"), "b")).await.expect("b joins");
    assert!(eventually(T, || a.resolve("b").is_some() && b.resolve("a").is_some()).await);
    let (a0, b0) = (a.status(), b.status());
    assert!(a0.key_expiry.is_some(), "status shows the expiry: {a0:?}");
    assert_eq!(a0.key_renewals, 0);

    citadel_e2e::serve_echo(b.listen_tcp(7000).unwrap());
    let ip = a.resolve("b").unwrap();
    let mut s = tokio::time::timeout(T, a.dial_tcp((ip, 7000).into())).await.unwrap().unwrap();
    let got = tokio::time::timeout(T, echo_line(&mut s, b"before")).await.unwrap().unwrap();
    assert_eq!(got, b"before");

    // Keys are renewed from halfway through their 6 s: two renewals each within 15 s.
    let mut echoes = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && (a.status().key_renewals < 2 || b.status().key_renewals < 2) {
        let msg = format!("during {echoes}");
        let got = tokio::time::timeout(T, echo_line(&mut s, msg.as_bytes())).await;
        assert_eq!(got.expect("echo within 10 s across a renewal").unwrap(), msg.as_bytes());
        echoes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (a1, b1) = (a.status(), b.status());
    assert!(a1.key_renewals >= 2 && b1.key_renewals >= 2, "renewals: a {} b {}", a1.key_renewals, b1.key_renewals);
    assert_ne!(a1.node_key, a0.node_key, "a has a new node key");
    assert_ne!(b1.node_key, b0.node_key);
    assert_eq!((a1.ipv4.clone(), b1.ipv4.clone()), (a0.ipv4.clone(), b0.ipv4.clone()), "mesh IPs unchanged");
    assert!(a1.key_expiry > a0.key_expiry, "{:?} -> {:?}", a0.key_expiry, a1.key_expiry);
    assert!(a1.connected && b1.connected);
    // The peer knows the new key (its map follows the server's record).
    assert!(
        eventually(T, || b.status().peers.iter().any(|p| p.name == "a" && p.node_key == a.status().node_key)).await,
        "b never learned a's new key"
    );
    // The server holds the renewed keys, unexpired, on the same node records.
    let nodes = nx.running.shared.store.nodes(None);
    assert_eq!(nodes.len(), 2);
    for n in &nodes {
        assert!(!n.is_expired(chrono::Utc::now()), "node {} expired on the server", n.given_name);
    }
    // The connection opened before the renewals still carries data both ways.
    let got = tokio::time::timeout(T, echo_line(&mut s, b"after")).await.unwrap().unwrap();
    assert_eq!(got, b"after");
    // The renewed key is what a restart uses: the state holds it, unconfirmed pair cleared.
    let id: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("a/identity.json")).unwrap()).unwrap();
    assert!(id.get("old_node_key").is_none(), "{id}");
}

/// With its own certificate nexus-sim speaks TLS only: a plain-HTTP request on the same port
/// gets a 400 that says to use https, and the connection closes; https on the port works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_refuses_plain_http_on_its_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_ca_dir, pki) = mint(&["localhost"]);
    let port = free_port();
    let _nx = tls_nexus(&pki, port, "localhost").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /key?v=88 HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut got)).await.expect("the server closes").unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 400") && got.contains("https only"), "{got}");
    assert!(!got.contains("publicKey"), "the server key went out in the clear: {got}");

    // A plain-http Nexus URL pointed at it fails instead of registering in the clear.
    let t = tempfile::tempdir().unwrap();
    let (o, _) = citadel(init_args(t.path(), &format!("http://localhost:{port}"), Some("k"), &[])).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("https only") || stderr(&o).contains("400"), "{}", stderr(&o));
}

/// The join time a user waits, three ways in one namespace and one run: `citadel init` against
/// nexus-sim over https (test CA) and over plain http, and the real Tailscale client's
/// equivalent (`caddy tailscale-auth`, tsnet v1.90.9: logs in, waits for its IPs, exits) over
/// the same https server, trusting the CA through `SSL_CERT_FILE`. Fresh state every run, 5 runs
/// each, interleaved; prints medians and ratios (`cargo test -p citadel-e2e --test tls
/// init_time_three_ways -- --nocapture`).
#[test]
fn init_time_three_ways_https_http_and_tsnet() {
    let Some(caddy) = citadel_e2e::real_peers("init time vs tsnet") else { return };
    let ns = citadel_e2e::Netns::new(&format!("cit-it-{}", std::process::id()), "10.208.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let https = citadel_e2e::NsNexus::start(&ns, 18590, &[], None);
    let plain = citadel_e2e::NsNexus::start_plain(&ns, 18591, &[], None);
    for n in [&https, &plain] {
        n.admin(&["users", "create", "bench"]);
    }
    let hk = https.admin(&["preauthkeys", "create", "--user", "bench", "--reusable"]);
    let pk = plain.admin(&["preauthkeys", "create", "--user", "bench", "--reusable"]);
    let ca = citadel_e2e::test_ca().ca_file();
    let timed = |c: &mut Command| {
        let start = Instant::now();
        let o = run_with_deadline(c, Duration::from_secs(60));
        (o, start.elapsed())
    };
    let (mut s, mut p, mut g) = (vec![], vec![], vec![]);
    for i in 0..5 {
        let (o, d) = timed(
            ns.cmd(bin("citadel"))
                .args(init_args(&tmp.path().join(format!("s{i}")), &https.url, Some(&hk), &[]))
                .env("SSL_CERT_FILE", &ca)
                .env("CITADEL_LOG", "warn"),
        );
        assert!(o.status.success(), "https init: {}", stderr(&o));
        s.push(d);
        let (o, d) = timed(
            ns.cmd(bin("citadel"))
                .args(init_args(&tmp.path().join(format!("p{i}")), &plain.url, Some(&pk), &[]))
                .env("CITADEL_LOG", "warn"),
        );
        assert!(o.status.success(), "http init: {}", stderr(&o));
        p.push(d);
        let home = tmp.path().join(format!("g{i}"));
        std::fs::create_dir_all(home.join("logs")).unwrap();
        let (o, d) = timed(
            ns.cmd(&caddy)
                .args(["tailscale-auth", "--control-url", &https.url, "--auth-key", &hk, "--hostname"])
                .arg(format!("ts{i}"))
                .arg("--state-dir")
                .arg(home.join("state"))
                .env("SSL_CERT_FILE", &ca)
                .env("HOME", &home)
                .env("XDG_CONFIG_HOME", &home)
                .env("XDG_DATA_HOME", &home)
                .env("TS_NO_LOGS_NO_SUPPORT", "true")
                .env("TS_LOGS_DIR", home.join("logs")),
        );
        assert!(o.status.success(), "tsnet login: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert!(said.contains("100.64."), "no mesh IP printed: {said}");
        g.push(d);
    }
    // Every join really registered: 5 citadel and 5 tsnet nodes on the https server.
    assert_eq!(https.nodes().len(), 10);
    assert_eq!(plain.nodes().len(), 5);
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let (s, p, g) = (med(&mut s), med(&mut p), med(&mut g));
    println!(
        "join time, median of 5: citadel init https {s:.1} ms, citadel init http {p:.1} ms, tsnet (caddy tailscale-auth) https {g:.1} ms; ratios https/http {:.2}, tsnet/citadel (https) {:.2}",
        s / p,
        g / s
    );
}
