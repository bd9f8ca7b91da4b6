//! The policy through Headscale's REST shape and the admin CLI: get shows the built-in org
//! isolation policy, a bad policy is refused with its lines and leaves the good one active,
//! a good one replaces it, and `policy check` works offline.

use nexus_sim::policy::{HEADSCALE_DEFAULT, ORG_ISOLATION};
use nexus_sim::Config;
use serde_json::{json, Value};
use std::process::Command;

const KEY: &str = "nsapi-policy-test-key-0123456789";

async fn start(policy: Option<&str>) -> nexus_sim::Running {
    nexus_sim::start(Config {
        api_keys: vec![KEY.into()],
        policy: policy.map(str::to_string),
        stun_listen: None,
        ..Config::default()
    })
    .await
    .expect("nexus-sim starts")
}

/// An HTTP client with nexus-sim's TLS settings (reqwest needs an explicit rustls config).
fn client() -> reqwest::Client {
    let tls = nexus_sim::tls::client_config().expect("TLS client config");
    reqwest::Client::builder().use_preconfigured_tls(tls).build().expect("client")
}

async fn call(url: &str, method: reqwest::Method, body: Option<Value>) -> (u16, Value) {
    let c = client();
    let mut rb = c.request(method, format!("{url}/api/v1/policy")).bearer_auth(KEY);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn rest_get_and_put_follow_headscale_shapes_and_refuse_bad_policies() {
    let n = start(None).await;
    let (st, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!(st, 200);
    assert_eq!(v["policy"], ORG_ISOLATION);
    let first = v["updatedAt"].as_str().unwrap().to_string();
    assert!(chrono::DateTime::parse_from_rfc3339(&first).is_ok(), "{first}");

    // No API key: refused.
    let r = client().get(format!("{}/api/v1/policy", n.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let bad =
        "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:ghosts\"], \"dst\": [\"*:22\"]},\n  ],\n}";
    let (st, v) = call(&n.url, reqwest::Method::PUT, Some(json!({"policy": bad}))).await;
    assert_eq!(st, 400);
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("line 3: Group \"group:ghosts\" is not defined"), "{msg}");
    assert_eq!(v["code"], 3);
    let (_, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!(v["policy"], ORG_ISOLATION, "a bad policy replaced the good one");

    let (st, v) = call(&n.url, reqwest::Method::PUT, Some(json!({"nope": 1}))).await;
    assert_eq!((st, v["code"].as_i64()), (400, Some(3)));

    let good = "// ssh only\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:22\"]}]}";
    let (st, v) = call(&n.url, reqwest::Method::PUT, Some(json!({"policy": good}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["policy"], good);
    let (_, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!(v["policy"], good);
    assert!(v["updatedAt"].as_str().unwrap() >= first.as_str());
}

#[tokio::test]
async fn headscale_default_shows_and_compiles_to_allow_all() {
    let n = start(Some(HEADSCALE_DEFAULT)).await;
    let (_, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!(v["policy"], HEADSCALE_DEFAULT);
    let bad = nexus_sim::start(Config { policy: Some("{\"acls\": 3}".into()), stun_listen: None, ..Config::default() })
        .await
        .err()
        .expect("a bad --policy stops the server from starting");
    assert!(bad.to_string().contains("\"acls\" must be an array"), "{bad}");
}

#[test]
fn cli_check_reports_lines_and_serve_refuses_a_bad_policy_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.hujson");
    std::fs::write(&good, ORG_ISOLATION).unwrap();
    let bad = dir.path().join("bad.hujson");
    std::fs::write(
        &bad,
        "{\n  // web\n  \"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:http\"]}],\n}",
    )
    .unwrap();
    let exe = env!("CARGO_BIN_EXE_nexus-sim");

    let out = Command::new(exe).args(["policy", "check", "--file"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("policy is valid"));

    let out = Command::new(exe).args(["policy", "check", "--file"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3: invalid port number"), "{err}");

    let out = Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--no-stun", "--policy"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started with a bad policy");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 3"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// With `--db`, a policy set through the API is stored (Headscale's database policy mode)
/// and is the one in force after each restart; a bad one is refused and never stored; an
/// explicit policy at start wins over the stored one.
#[tokio::test]
async fn a_policy_set_through_the_api_survives_restarts_with_db() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nexus.db");
    let boot = |policy: Option<&str>| {
        let db = db.clone();
        let policy = policy.map(str::to_string);
        async move {
            nexus_sim::start(Config {
                api_keys: vec![KEY.into()],
                db: Some(db),
                policy,
                stun_listen: None,
                ..Config::default()
            })
            .await
            .expect("nexus-sim starts")
        }
    };
    let good =
        "// kept across restarts\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:22\"]}]}\n";
    let n = boot(None).await;
    let (code, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!((code, v["policy"].as_str()), (200, Some(ORG_ISOLATION)), "{v}");
    let (code, v) = call(&n.url, reqwest::Method::PUT, Some(json!({"policy": good}))).await;
    assert_eq!(code, 200, "{v}");
    let set_at = v["updatedAt"].clone();
    drop(n);

    // First restart: the stored policy is in force; a bad one is refused and not stored.
    let n = boot(None).await;
    let (code, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!((code, v["policy"].as_str()), (200, Some(good)), "{v}");
    assert_eq!(v["updatedAt"], set_at, "the time it was set is kept too");
    let (code, v) =
        call(&n.url, reqwest::Method::PUT, Some(json!({"policy": "{\"acls\": [{\"action\": \"drop\"}]}"}))).await;
    assert_eq!(code, 400, "{v}");
    drop(n);

    // Second restart: still the good one.
    let n = boot(None).await;
    let (_, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!(v["policy"].as_str(), Some(good), "{v}");
    let (code, _) = call(&n.url, reqwest::Method::PUT, Some(json!({"policy": HEADSCALE_DEFAULT}))).await;
    assert_eq!(code, 200);
    drop(n);

    // Third: the newest stored wins; an explicit policy at start overrides it.
    let n = boot(None).await;
    let (_, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!(v["policy"].as_str(), Some(HEADSCALE_DEFAULT), "{v}");
    drop(n);
    let n = boot(Some(ORG_ISOLATION)).await;
    let (_, v) = call(&n.url, reqwest::Method::GET, None).await;
    assert_eq!(v["policy"].as_str(), Some(ORG_ISOLATION), "{v}");
}

/// A stored policy that no longer parses stops the server with a clear error instead of
/// being replaced silently by the built-in one.
#[tokio::test]
async fn a_corrupt_stored_policy_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nexus.db");
    {
        let store = nexus_sim::store::Store::open(Some(&db)).unwrap();
        store.store_policy("{\"acls\": [", chrono::Utc::now()).unwrap();
    }
    let cfg = Config { db: Some(db.clone()), stun_listen: None, ..Config::default() };
    let e = nexus_sim::start(cfg).await.err().expect("refused");
    assert!(e.to_string().contains("policy stored in the database is invalid"), "{e}");
    let cfg = Config { db: Some(db), policy: Some(ORG_ISOLATION.into()), stun_listen: None, ..Config::default() };
    assert!(nexus_sim::start(cfg).await.is_ok(), "an explicit policy replaces it");
}
