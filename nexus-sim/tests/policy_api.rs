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
