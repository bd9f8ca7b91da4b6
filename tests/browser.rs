//! The approval page in a real headless browser (Debian's `chromium` through `chromedriver`):
//! while the real `citadel login` binary waits, the browser signs in with the admin API key,
//! checks the device's code and host name, picks the org and approves; citadel then joins.
//! A screenshot of each step goes to `$CITADEL_SCREENSHOT_DIR` (else a temporary directory).

use citadel_e2e::{bin, free_port, run_with_deadline, Proc};
use fantoccini::{ClientBuilder, Locator};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Skips, or fails under `CITADEL_REQUIRE_REAL` (as `.ci/run` sets it).
fn require_or_skip(test: &str, why: &str) {
    if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
        panic!("{test} required (CITADEL_REQUIRE_REAL is set) but {why}");
    }
    println!("skipping {test}: {why}");
}

/// chromedriver and the browsers it starts, in a process group killed on drop (also on a panic).
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this test created; no memory is involved.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(15), "port {port} never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn shot(c: &fantoccini::Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(dir.join(name), png).unwrap();
}

#[test]
fn browser_approves_a_waiting_citadel_login() {
    let (Some(chromium), Some(driver)) = (which("chromium"), which("chromedriver")) else {
        return require_or_skip(
            "browser_approves_a_waiting_citadel_login",
            "chromium or chromedriver is not installed",
        );
    };

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _nexus = Proc(
        Command::new(bin("nexus-sim"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--api-key", "admin-key"])
            .args(["--device-poll-interval", "1"])
            .env("NEXUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(port);
    for org in ["acme", "research"] {
        let o = run_with_deadline(
            Command::new(bin("nexus-sim"))
                .args(["users", "create", org])
                .env("NEXUS_URL", &url)
                .env("NEXUS_API_KEY", "admin-key"),
            Duration::from_secs(20),
        );
        assert!(o.status.success());
    }

    let dport = free_port();
    let _driver = Group(
        Command::new(&driver)
            .args([format!("--port={dport}"), "--allowed-ips=127.0.0.1".into()])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(dport);

    let state = tempfile::tempdir().unwrap();
    let mut login = Proc(
        Command::new(bin("citadel"))
            .arg("--state-dir")
            .arg(state.path())
            .args(["login", "--auth-service", &url, "--hostname", "lab-gpu-1", "--login-timeout", "60", "--no-qr"])
            .env_remove("CITADEL_NEXUS")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let err = login.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = |f: &dyn Fn(&str) -> bool| loop {
        let l = rx.recv_timeout(Duration::from_secs(30)).expect("citadel login printed nothing expected");
        if f(&l) {
            return l;
        }
    };
    let link = next(&|l| l.contains("/device?code=")).trim().to_string();
    let code = link.rsplit('=').next().unwrap().to_string();

    let kept = std::env::var_os("CITADEL_SCREENSHOT_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = kept.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(90), async {
            let mut caps = fantoccini::wd::Capabilities::new();
            caps.insert(
                "goog:chromeOptions".into(),
                serde_json::json!({
                    "binary": chromium,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--window-size=900,760", "--no-first-run", "--disable-extensions"],
                }),
            );
            let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{dport}"))
                .await
                .expect("a chromium session");

            // Step 1: the link citadel printed opens the sign-in form.
            c.goto(&link).await.unwrap();
            let field = c.wait().for_element(Locator::Id("credential")).await.unwrap();
            shot(&c, &dir, "1-sign-in.png").await;
            assert!(!c.source().await.unwrap().contains("lab-gpu-1"), "nothing about the device before sign-in");

            // Step 2: a wrong key is refused; the right one shows the device.
            field.send_keys("not-the-key").await.unwrap();
            c.find(Locator::Id("signin")).await.unwrap().click().await.unwrap();
            let msg = c.wait().for_element(Locator::Id("msg")).await.unwrap().text().await.unwrap();
            assert!(msg.contains("not an admin API key"), "{msg}");
            shot(&c, &dir, "2-wrong-key.png").await;
            c.find(Locator::Id("credential")).await.unwrap().send_keys("admin-key").await.unwrap();
            c.find(Locator::Id("signin")).await.unwrap().click().await.unwrap();
            c.wait().for_element(Locator::Id("approve")).await.unwrap();
            assert_eq!(c.find(Locator::Id("user-code")).await.unwrap().text().await.unwrap(), code);
            assert_eq!(c.find(Locator::Id("hostname")).await.unwrap().text().await.unwrap(), "lab-gpu-1");
            c.find(Locator::Id("org")).await.unwrap().select_by_label("research").await.unwrap();
            shot(&c, &dir, "3-approve.png").await;

            // Step 3: approve.
            c.find(Locator::Id("approve")).await.unwrap().click().await.unwrap();
            let msg = c.wait().for_element(Locator::Id("msg")).await.unwrap().text().await.unwrap();
            assert!(msg.contains("Approved") && msg.contains("lab-gpu-1") && msg.contains("research"), "{msg}");
            shot(&c, &dir, "4-approved.png").await;
            c.close().await.unwrap();
        })
        .await
        .expect("the browser steps took over 90 s");
    });

    // citadel, still waiting, receives the grant and joins the org the admin picked.
    let joined = next(&|l| l.contains("logged in as"));
    assert!(joined.contains("lab-gpu-1") && joined.contains("research"), "{joined}");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = login.0.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "citadel login did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    login.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success() && out.trim().starts_with("100."), "{status:?} {out}");
    for f in ["1-sign-in.png", "2-wrong-key.png", "3-approve.png", "4-approved.png"] {
        assert!(std::fs::metadata(dir.join(f)).unwrap().len() > 1000, "{f} is a real image");
    }
    println!("screenshots in {}", dir.display());
}
