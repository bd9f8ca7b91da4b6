//! The mesh for other programs, proven with real programs on loopback: `citadel up --expose`
//! puts a Python web server and OpenSSH's sshd on mesh ports; curl fetches through
//! `--socks5` and `--http-proxy` by short name (hash-checked), ssh runs a command through
//! `ProxyCommand='citadel connect %h:%p'` and through SOCKS5 (`nc -X 5`), `whois` names the
//! peer, `expose add|remove` works at run time, and `--metrics` (and nexus-sim's `/metrics`)
//! parse as Prometheus text with counters that move with the traffic.

use citadel_e2e::{bin, free_port, run_with_deadline, Proc};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
/// Size in MiB of the file fetched through each proxy: 8 keeps a debug-build run short;
/// `CITADEL_PROGRAMS_MIB=100 cargo test --release -p citadel-e2e --test programs` runs the
/// 100 MiB download.
fn file_mib() -> usize {
    std::env::var("CITADEL_PROGRAMS_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

struct World {
    url: String,
    dir: tempfile::TempDir,
    _nexus: Proc,
    nexus_port: u16,
    key: String,
}

impl World {
    fn start() -> World {
        let nexus_port = free_port();
        let url = format!("https://127.0.0.1:{nexus_port}");
        let nexus = Proc(
            Command::new(bin("nexus-sim"))
                .args(["serve", "--listen", &format!("127.0.0.1:{nexus_port}"), "--api-key", "programs-admin"])
                .args(citadel_e2e::test_ca().serve_args())
                .env("NEXUS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_port(nexus_port);
        let admin = |args: &[&str]| {
            let o = run_with_deadline(
                Command::new(bin("nexus-sim")).args(args).env("NEXUS_URL", &url).env("NEXUS_API_KEY", "programs-admin"),
                T,
            );
            assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap().trim().to_string()
        };
        admin(&["users", "create", "acme"]);
        let key = admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);
        World { url, dir: tempfile::tempdir().unwrap(), _nexus: nexus, nexus_port, key }
    }

    fn state(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    /// `citadel up` for `node` with extra flags; its stderr goes to `<node>.log`.
    fn up(&self, node: &str, extra: &[&str]) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(format!("{node}.log"))).unwrap();
        let p = Proc(
            Command::new(bin("citadel"))
                .arg("--state-dir")
                .arg(self.state(node))
                .args(["up", "--authkey", &self.key, "--nexus", &self.url, "--hostname", node])
                .args(extra)
                .env("CITADEL_LOG", "info,boringtun=error")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let start = Instant::now();
        while !self.state(node).join("citadel.sock").exists() {
            assert!(start.elapsed() < T, "{node} did not come up: {}", self.log(node));
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{node}.log"))).unwrap_or_default()
    }

    fn citadel(&self, node: &str, args: &[&str]) -> Output {
        run_with_deadline(Command::new(bin("citadel")).arg("--state-dir").arg(self.state(node)).args(args), T)
    }

    fn status(&self, node: &str) -> serde_json::Value {
        let o = self.citadel(node, &["status", "--json"]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }
}

fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < T, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn sha(p: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(p).unwrap()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A plain HTTP GET over loopback; returns the body.
fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn scrape(port: u16) -> prometheus_parse::Scrape {
    let body = http_get(port, "/metrics");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("metrics parse as Prometheus text")
}

fn sample(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    s.samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
}

/// `/metrics` of the https nexus-sim (test CA), through curl.
fn scrape_https(port: u16) -> prometheus_parse::Scrape {
    let mut c = Command::new("curl");
    c.args(["-sf", "--max-time", "10", "--cacert"])
        .arg(citadel_e2e::test_ca().ca_file())
        .arg(format!("https://127.0.0.1:{port}/metrics"));
    let o = run_with_deadline(&mut c, T);
    assert!(o.status.success(), "GET /metrics: {}", String::from_utf8_lossy(&o.stderr));
    let body = String::from_utf8_lossy(&o.stdout).to_string();
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("metrics parse as Prometheus text")
}

/// sshd on a loopback port with a fresh host key, accepting one client key for root.
struct Sshd {
    port: u16,
    client_key: PathBuf,
    _proc: Proc,
}

fn start_sshd(dir: &Path) -> Option<Sshd> {
    if !Path::new("/usr/sbin/sshd").exists() {
        return None;
    }
    let d = dir.join("ssh");
    std::fs::create_dir_all(&d).unwrap();
    let keygen = |name: &str| {
        let o = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(name))
            .output()
            .unwrap();
        assert!(o.status.success(), "ssh-keygen: {}", text(&o));
    };
    keygen("host");
    keygen("client");
    std::fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
    // sshd insists on its privilege-separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = free_port();
    let cfg = d.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nPidFile {}\n",
            d.join("host").display(),
            d.join("authorized_keys").display(),
            d.join("sshd.pid").display()
        ),
    )
    .unwrap();
    let p = Proc(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_port(port);
    Some(Sshd { port, client_key: d.join("client"), _proc: p })
}

fn ssh(sshd: &Sshd, proxy_command: &str) -> Output {
    run_with_deadline(
        Command::new("ssh")
            .arg("-i")
            .arg(&sshd.client_key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                &format!("ProxyCommand={proxy_command}"),
                "-p",
                "22",
                "root@bravo",
                "echo ssh-ran-$((40+2))",
            ])
            .stdin(Stdio::null()),
        T,
    )
}

#[test]
fn real_programs_reach_exposed_services_through_proxies_and_ssh() {
    let w = World::start();
    // The web root: a hash-checked file and a small page.
    let www = w.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let mib = file_mib();
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(www.join("file.bin"), &data).unwrap();
    std::fs::write(www.join("index.html"), "exposed page from bravo\n").unwrap();
    let want = hex(&Sha256::digest(&data));
    let web_port = free_port();
    let _web = Proc(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &web_port.to_string()])
            .current_dir(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(web_port);
    let sshd = start_sshd(w.dir.path());

    let (socks, http, m_alpha, m_bravo) = (free_port(), free_port(), free_port(), free_port());
    let mut bravo_flags = vec![
        "--expose".to_string(),
        format!("8080=127.0.0.1:{web_port}"),
        "--metrics".into(),
        format!("127.0.0.1:{m_bravo}"),
    ];
    if let Some(s) = &sshd {
        bravo_flags.extend(["--expose".to_string(), format!("22=127.0.0.1:{}", s.port)]);
    }
    let bravo_flags: Vec<&str> = bravo_flags.iter().map(String::as_str).collect();
    let _bravo = w.up("bravo", &bravo_flags);
    let _alpha = w.up(
        "alpha",
        &[
            "--socks5",
            &format!("127.0.0.1:{socks}"),
            "--http-proxy",
            &format!("127.0.0.1:{http}"),
            "--metrics",
            &format!("127.0.0.1:{m_alpha}"),
        ],
    );
    let start = Instant::now();
    let (bravo_ip, bravo_fqdn) = loop {
        let st = w.status("alpha");
        if let Some(p) =
            st["peers"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "bravo" && p["ipv4"].is_string()))
        {
            break (p["ipv4"].as_str().unwrap().to_string(), p["fqdn"].as_str().unwrap().to_string());
        }
        assert!(start.elapsed() < T, "alpha never saw bravo: {st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let before = scrape(m_alpha);
    let rx_before = sample(&before, "citadel_peer_rx_bytes_total", Some(("peer", "bravo")));

    // curl through SOCKS5 (the proxy resolves the short name) and through the HTTP proxy,
    // plain and CONNECT-tunnelled; every copy hash-checked.
    let curl = |args: &[&str], out: &Path| {
        let t = Instant::now();
        let o = run_with_deadline(
            Command::new("curl").args(["-sS", "--fail", "--max-time", "120", "-o"]).arg(out).args(args),
            T * 3,
        );
        assert!(
            o.status.success(),
            "curl {args:?}: {}\nalpha: {}\nbravo: {}",
            text(&o),
            w.log("alpha"),
            w.log("bravo")
        );
        let mib = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
        println!("curl {args:?}: {mib:.1} MiB in {:?} ({:.1} MiB/s)", t.elapsed(), mib / t.elapsed().as_secs_f64());
    };
    let out = w.dir.path().join("out.bin");
    for args in [
        vec!["--socks5-hostname".to_string(), format!("127.0.0.1:{socks}"), "http://bravo:8080/file.bin".into()],
        vec!["--proxy".to_string(), format!("http://127.0.0.1:{http}"), "http://bravo:8080/file.bin".into()],
        vec![
            "--proxytunnel".to_string(),
            "--proxy".into(),
            format!("http://127.0.0.1:{http}"),
            format!("http://{bravo_fqdn}:8080/file.bin"),
        ],
        vec!["--socks5".to_string(), format!("127.0.0.1:{socks}"), format!("http://{bravo_ip}:8080/file.bin")],
    ] {
        let _ = std::fs::remove_file(&out);
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>(), &out);
        assert_eq!(sha(&out), want, "{args:?}: download differs");
    }

    // Two URLs in one curl run: the HTTP proxy keeps the client's connection open between them.
    let o = run_with_deadline(
        Command::new("curl").args([
            "-sv",
            "--fail",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "--proxy",
            &format!("http://127.0.0.1:{http}"),
            "http://bravo:8080/file.bin",
            "http://bravo:8080/file.bin",
        ]),
        T,
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "two fetches through the HTTP proxy: {log}");
    assert!(log.contains("Re-using existing connection"), "curl opened a second connection: {log}");

    // Refusals answer at once with the right codes: a name outside the mesh (never resolved,
    // nothing leaves loopback) and a closed mesh port.
    let refused = |args: &[&str]| {
        let t = Instant::now();
        let o =
            run_with_deadline(Command::new("curl").args(["-sS", "--max-time", "20", "-o", "/dev/null"]).args(args), T);
        assert!(
            !o.status.success() && t.elapsed() < Duration::from_secs(15),
            "{args:?} was not refused promptly: {}",
            text(&o)
        );
        text(&o)
    };
    let e = refused(&["--socks5-hostname", &format!("127.0.0.1:{socks}"), "http://nosuchpeer.invalid/"]);
    assert!(e.contains("not allowed") || e.contains("ruleset") || e.contains("(2)"), "SOCKS reply 2 expected: {e}");
    let e = refused(&["--socks5-hostname", &format!("127.0.0.1:{socks}"), "http://bravo:9/"]);
    assert!(e.to_lowercase().contains("refused") || e.contains("(5)"), "SOCKS reply 5 expected: {e}");
    let o = run_with_deadline(
        Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--proxy",
            &format!("http://127.0.0.1:{http}"),
            "http://nosuchpeer.invalid/",
        ]),
        T,
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "403");

    // whois names bravo.
    let o = w.citadel("alpha", &["whois", &format!("{bravo_ip}:8080"), "--json"]);
    let who: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("whois: {}", text(&o)));
    assert_eq!((who["name"].as_str(), who["org"].as_str()), (Some("bravo"), Some("acme")), "{who}");
    assert_eq!(who["node_key"], w.status("bravo")["node_key"]);

    // Exposes change at run time.
    let o = w.citadel("bravo", &["expose", "add", &format!("8081={web_port}")]);
    assert!(o.status.success(), "{}", text(&o));
    let page = w.dir.path().join("page.html");
    curl(&["--socks5-hostname", &format!("127.0.0.1:{socks}"), "http://bravo:8081/index.html"], &page);
    assert_eq!(std::fs::read_to_string(&page).unwrap(), "exposed page from bravo\n");
    let o = w.citadel("bravo", &["expose", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        list.as_array().unwrap().iter().any(|e| e["mesh_port"] == 8081 && e["accepted"].as_u64() >= Some(1)),
        "{list}"
    );
    assert!(w.citadel("bravo", &["expose", "remove", "8081"]).status.success());
    refused(&["--socks5-hostname", &format!("127.0.0.1:{socks}"), "http://bravo:8081/index.html"]);
    let st = w.status("bravo");
    assert!(st["exposes"].as_array().unwrap().iter().any(|e| e["mesh_port"] == 8080), "{st}");
    let st = w.status("alpha");
    let kinds: Vec<&str> = st["listeners"].as_array().unwrap().iter().filter_map(|l| l["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["socks5", "http-proxy"], "{st}");

    // OpenSSH through the mesh: ProxyCommand with `citadel connect`, and with SOCKS5.
    if let Some(s) = &sshd {
        let connect = format!("{} --state-dir {} connect %h:%p", bin("citadel").display(), w.state("alpha").display());
        let o = ssh(s, &connect);
        assert!(o.status.success() && text(&o).contains("ssh-ran-42"), "ssh via citadel connect: {}", text(&o));
        let o = ssh(s, &format!("nc -X 5 -x 127.0.0.1:{socks} %h %p"));
        assert!(o.status.success() && text(&o).contains("ssh-ran-42"), "ssh via SOCKS5: {}", text(&o));
    } else if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
        panic!("OpenSSH (/usr/sbin/sshd, ssh, nc) is required under CITADEL_REQUIRE_REAL");
    } else {
        println!("sshd not installed: skipped the OpenSSH part");
    }

    // Metrics parse and moved with the traffic.
    let after = scrape(m_alpha);
    let rx_after = sample(&after, "citadel_peer_rx_bytes_total", Some(("peer", "bravo")));
    assert!(rx_after - rx_before >= (4 * mib << 20) as f64, "rx bytes {rx_before} -> {rx_after}");
    assert!(sample(&after, "citadel_handshakes_total", None) >= 1.0);
    assert!(sample(&after, "citadel_peers", Some(("path", "direct"))) >= 1.0);
    let b = scrape(m_bravo);
    assert!(sample(&b, "citadel_expose_connections_total", Some(("port", "8080"))) >= 4.0);
    let nexus = scrape_https(w.nexus_port);
    assert_eq!(sample(&nexus, "nexus_nodes_online", None), 2.0);
    assert!(sample(&nexus, "nexus_map_sends_total", None) >= 2.0);
    // Two full maps at least, each well over 100 bytes even compressed.
    assert!(sample(&nexus, "nexus_map_bytes_total", None) >= 200.0);
    assert!(sample(&nexus, "nexus_registrations_total", None) >= 2.0);
}

#[test]
fn non_loopback_proxy_needs_opt_in_and_credentials() {
    let w = World::start();
    let o = run_with_deadline(
        Command::new(bin("citadel")).arg("--state-dir").arg(w.state("c")).args([
            "up",
            "--authkey",
            &w.key,
            "--nexus",
            &w.url,
            "--hostname",
            "c",
            "--socks5",
            "0.0.0.0:0",
        ]),
        T,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a loopback address"), "{}", text(&o));
    let o = run_with_deadline(
        Command::new(bin("citadel"))
            .arg("--state-dir")
            .arg(w.state("c"))
            .args(["up", "--socks5", "0.0.0.0:0", "--proxy-allow-non-loopback"])
            .env_remove("CITADEL_PROXY_AUTH"),
        T,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("without credentials"), "{}", text(&o));
}

/// A loopback TCP server that discards what it reads and reports each connection's byte count.
async fn sink_server() -> (u16, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = tx.send(n);
            });
        }
    });
    (port, rx)
}

/// Writes for `dur` into `s`, closes, and returns MB/s as the receiver counted it (`got`).
async fn blast<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    dur: Duration,
    got: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
) -> f64 {
    use tokio::io::AsyncWriteExt;
    let chunk = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    while start.elapsed() < dur {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(60), got.recv()).await.unwrap().unwrap();
    n as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// Opens a SOCKS5 CONNECT to `host:port` through the proxy at `proxy`.
async fn socks_connect(proxy: std::net::SocketAddr, host: &str, port: u16) -> tokio::net::TcpStream {
    try_socks_connect(proxy, host, port).await.unwrap()
}

/// Like [`socks_connect`], with the failure (including the SOCKS reply code) as an error.
async fn try_socks_connect(
    proxy: std::net::SocketAddr,
    host: &str,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let mut req = vec![5, 1, 0, 5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).await?;
    if (reply[0], reply[1], reply[2], reply[3]) != (5, 0, 5, 0) {
        return Err(std::io::Error::other(format!("SOCKS5 reply {reply:?}")));
    }
    Ok(s)
}

fn bench_secs() -> Duration {
    Duration::from_secs(std::env::var("CITADEL_BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5))
}

/// Throughput through the in-process API, through `--expose`, and through SOCKS5 (+ expose),
/// in one run, plus SOCKS5 connections per second. Run:
/// `cargo test --release -p citadel-e2e --test programs -- --ignored --nocapture programs_bench_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "bench"]
async fn programs_bench_throughput() {
    use citadel::mesh::{Config, Mesh};
    use citadel::proxy_server::{ProxyConfig, ProxyKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nx = citadel_e2e::Nexus::start().await;
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let cfg = |name: &str| {
        let mut c = Config::new(Some(nx.url()), Some(key.clone()), t.path().join(name));
        c.hostname = Some(name.to_string());
        c
    };
    let a = Mesh::connect(cfg("alpha")).await.unwrap();
    let b = Mesh::connect(cfg("bravo")).await.unwrap();
    assert!(citadel_e2e::eventually(Duration::from_secs(10), || a.resolve("bravo").is_some()).await);
    let ip = a.resolve("bravo").unwrap();
    let dur = bench_secs();

    // In-process API: a mesh listener on bravo counting bytes.
    let l = b.listen_tcp(7000).unwrap();
    let (tx, mut api_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = tx.send(n);
            });
        }
    });
    // Warm-up (handshake, direct path).
    let mut s = a.dial_tcp((ip, 7000).into()).await.unwrap();
    blast(&mut s, Duration::from_millis(500), &mut api_rx).await;
    let mut s = a.dial_tcp((ip, 7000).into()).await.unwrap();
    let api = blast(&mut s, dur, &mut api_rx).await;

    let (sink, mut sink_rx) = sink_server().await;
    b.expose(format!("7001=127.0.0.1:{sink}").parse().unwrap()).unwrap();
    let mut s = a.dial_tcp((ip, 7001).into()).await.unwrap();
    let expose = blast(&mut s, dur, &mut sink_rx).await;

    let proxy = a.start_proxy(ProxyKind::Socks5, ProxyConfig::new("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let mut s = socks_connect(proxy, "bravo", 7001).await;
    let socks = blast(&mut s, dur, &mut sink_rx).await;
    println!("throughput over {dur:?} each (MB/s): in-process API {api:.1}, --expose {expose:.1} ({:.2} of API), SOCKS5+expose {socks:.1} ({:.2} of API)", expose / api, socks / api);

    // Connections per second: SOCKS5 CONNECT to an exposed one-byte echo, 8 at a time.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
            });
        }
    });
    b.expose(format!("7002=127.0.0.1:{echo_port}").parse().unwrap()).unwrap();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..8 {
        workers.push(tokio::spawn(async move {
            let (mut n, mut failed) = (0u64, 0u64);
            while start.elapsed() < dur {
                let one = async {
                    let mut s = try_socks_connect(proxy, "bravo", 7002).await?;
                    s.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await
                };
                match one.await {
                    Ok(_) => n += 1,
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            println!("first failed connection: {e}");
                        }
                    }
                }
            }
            (n, failed)
        }));
    }
    let (mut conns, mut failed) = (0, 0);
    for w in workers {
        let (n, f) = w.await.unwrap();
        conns += n;
        failed += f;
    }
    let cps = conns as f64 / start.elapsed().as_secs_f64();
    println!("SOCKS5 connections/s (8 concurrent, CONNECT + 1-byte echo through --expose): {cps:.0} ({conns} ok, {failed} failed)");
    assert!(api > 0.0 && expose > 0.0 && socks > 0.0 && conns > 0);
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// RSS of `citadel up` with 10 exposed ports (bravo) and of the SOCKS5 side (alpha) while 100
/// proxied connections are open. Run:
/// `cargo test --release -p citadel-e2e --test programs -- --ignored --nocapture programs_bench_rss`
#[test]
#[ignore = "bench"]
fn programs_bench_rss() {
    let w = World::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sink, _rx) = rt.block_on(sink_server());
    let socks = free_port();
    let mut flags = Vec::new();
    for i in 0..10 {
        flags.push("--expose".to_string());
        flags.push(format!("{}=127.0.0.1:{sink}", 9000 + i));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let bravo = w.up("bravo", &flags);
    let alpha = w.up("alpha", &["--socks5", &format!("127.0.0.1:{socks}")]);
    let start = Instant::now();
    while !w.status("alpha")["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == "bravo")) {
        assert!(start.elapsed() < T, "alpha never saw bravo");
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle = (rss_kib(alpha.0.id()), rss_kib(bravo.0.id()));
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{socks}").parse().unwrap();
    let conns = rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut conns = Vec::new();
        for i in 0..100u16 {
            let mut s = socks_connect(proxy, "bravo", 9000 + i % 10).await;
            s.write_all(&vec![7u8; 64 << 10]).await.unwrap();
            conns.push(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        conns
    });
    let busy = (rss_kib(alpha.0.id()), rss_kib(bravo.0.id()));
    println!("RSS KiB idle: alpha (SOCKS5) {} bravo (10 exposes) {}", idle.0, idle.1);
    println!("RSS KiB with 100 open proxied connections: alpha {} bravo {}", busy.0, busy.1);
    let st = w.status("bravo");
    let active: u64 = st["exposes"].as_array().unwrap().iter().map(|e| e["active"].as_u64().unwrap_or(0)).sum();
    assert_eq!(active, 100, "{st}");
    drop(conns);
}

/// The library side: `Mesh::listen` hands each inbound connection over with the identity
/// `whois` gives, and a UDP expose forwards datagrams to a local UDP service and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_accept_names_the_peer_and_udp_expose_round_trips() {
    use citadel::mesh::{Config, Mesh};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nx = citadel_e2e::Nexus::start().await;
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let cfg = |name: &str| {
        let mut c = Config::new(Some(nx.url()), Some(key.clone()), t.path().join(name));
        c.hostname = Some(name.to_string());
        c.timeout = Duration::from_secs(5);
        c
    };
    let a = Mesh::connect(cfg("alpha")).await.unwrap();
    let b = Mesh::connect(cfg("bravo")).await.unwrap();
    assert!(
        citadel_e2e::eventually(Duration::from_secs(10), || a.resolve("bravo").is_some()
            && b.resolve("alpha").is_some())
        .await
    );
    let bravo = a.resolve("bravo").unwrap();

    let l = b.listen(7100).unwrap();
    let accept = tokio::spawn(async move {
        let mut c = l.accept().await.unwrap();
        let mut buf = [0u8; 5];
        c.stream.read_exact(&mut buf).await.unwrap();
        (c.who, c.remote)
    });
    let mut s = tokio::time::timeout(Duration::from_secs(10), a.dial_tcp((bravo, 7100).into())).await.unwrap().unwrap();
    s.write_all(b"hello").await.unwrap();
    let (who, remote) = tokio::time::timeout(Duration::from_secs(10), accept).await.unwrap().unwrap();
    let who = who.expect("the peer is in bravo's netmap");
    assert_eq!((who.name.as_str(), who.org.as_str(), who.is_self), ("alpha", "acme", false));
    assert_eq!(who.node_key, a.node_key().to_string());
    assert_eq!(b.whois(remote.ip()), Some(who));

    // UDP: bravo exposes a loopback UDP echo on mesh port 5300.
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            if &buf[..n] == b"big" {
                // Too large for the mesh, then a small one.
                let _ = echo.send_to(&[b'x'; 3000], from).await;
                let _ = echo.send_to(b"echo:after-big", from).await;
                continue;
            }
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(&buf[..n]);
            let _ = echo.send_to(&out, from).await;
        }
    });
    b.expose(format!("udp:5300={echo_port}").parse().unwrap()).unwrap();
    let u = a.bind_udp(0).unwrap();
    let mut buf = [0u8; 2048];
    let mut answered = None;
    for _ in 0..20 {
        u.send_to(b"ping", (bravo, 5300).into()).await.unwrap();
        if let Ok(Ok((n, from))) = tokio::time::timeout(Duration::from_millis(500), u.recv_from(&mut buf)).await {
            answered = Some((buf[..n].to_vec(), from));
            break;
        }
    }
    let (got, from) = answered.expect("no answer through the UDP expose");
    assert_eq!((got.as_slice(), from), (&b"echo:ping"[..], std::net::SocketAddr::from((bravo, 5300))));
    let list = b.exposes();
    assert_eq!((list[0].accepted, list[0].active), (1, 1), "{list:?}");
    // A reply larger than the mesh carries is dropped whole, never cut to fit: the next one
    // arrives, and nothing else but late echoes of the pings above.
    u.send_to(b"big", (bravo, 5300).into()).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (n, _) = u.recv_from(&mut buf).await.unwrap();
            if &buf[..n] != b"echo:ping" {
                return buf[..n].to_vec();
            }
        }
    });
    assert_eq!(next.await.expect("no reply after the oversized one"), b"echo:after-big");

    // The same echo through alpha's SOCKS5 proxy: UDP ASSOCIATE over the real mesh, the
    // destination named by its short mesh name.
    let cfg = citadel::proxy_server::ProxyConfig::new("127.0.0.1:0".parse().unwrap());
    let proxy = a.start_proxy(citadel::proxy_server::ProxyKind::Socks5, cfg).await.unwrap();
    let mut ctl = tokio::net::TcpStream::connect(proxy).await.unwrap();
    ctl.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    ctl.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    ctl.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
    let mut rep = [0u8; 10];
    ctl.read_exact(&mut rep).await.unwrap();
    assert_eq!(&rep[..4], &[5, 0, 0, 1], "UDP ASSOCIATE refused: {rep:?}");
    let relay = std::net::SocketAddr::from(([rep[4], rep[5], rep[6], rep[7]], u16::from_be_bytes([rep[8], rep[9]])));
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut dgram = vec![0, 0, 0, 3, 5];
    dgram.extend_from_slice(b"bravo");
    dgram.extend_from_slice(&5300u16.to_be_bytes());
    dgram.extend_from_slice(b"via socks");
    let mut answered = None;
    for _ in 0..20 {
        client.send_to(&dgram, relay).await.unwrap();
        if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await {
            answered = Some(buf[..n].to_vec());
            break;
        }
    }
    let got = answered.expect("no answer through SOCKS5 UDP ASSOCIATE");
    let mut want = vec![0, 0, 0, 1];
    match bravo {
        std::net::IpAddr::V4(v4) => want.extend_from_slice(&v4.octets()),
        std::net::IpAddr::V6(_) => panic!("bravo resolved to IPv6"),
    }
    want.extend_from_slice(&5300u16.to_be_bytes());
    want.extend_from_slice(b"echo:via socks");
    assert_eq!(got, want, "the reply names bravo's mesh address and carries the echo");
    // Closing the control connection ends the association: nothing is relayed any more.
    drop(ctl);
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.send_to(&dgram, relay).await.unwrap();
    let late = tokio::time::timeout(Duration::from_millis(800), client.recv_from(&mut buf)).await;
    assert!(late.is_err(), "the association outlived its TCP connection");
}
