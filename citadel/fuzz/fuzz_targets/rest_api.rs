//! Sends arbitrary requests to nexus-sim's HTTP routes (REST API, device flow, key, register
//! page) in process: the first byte picks the route and whether the admin key is sent, the
//! bytes up to the first newline fill the path parameters, the rest is the body. No request
//! may panic the server or make it answer 500.
#![no_main]

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use tower::ServiceExt;

const KEY: &str = "fuzz-admin-key-0123456789";

const ROUTES: &[(Method, &str)] = &[
    (Method::GET, "/api/v1/user"),
    (Method::POST, "/api/v1/user"),
    (Method::DELETE, "/api/v1/user/{}"),
    (Method::POST, "/api/v1/user/{}/rename/{}"),
    (Method::GET, "/api/v1/preauthkey"),
    (Method::POST, "/api/v1/preauthkey"),
    (Method::POST, "/api/v1/preauthkey/expire"),
    (Method::GET, "/api/v1/node"),
    (Method::POST, "/api/v1/node/register"),
    (Method::GET, "/api/v1/node/{}"),
    (Method::DELETE, "/api/v1/node/{}"),
    (Method::POST, "/api/v1/node/{}/expire"),
    (Method::POST, "/api/v1/node/{}/rename/{}"),
    (Method::GET, "/api/v1/policy"),
    (Method::PUT, "/api/v1/policy"),
    (Method::GET, "/api/v1/apikey"),
    (Method::POST, "/api/v1/apikey"),
    (Method::POST, "/api/v1/apikey/expire"),
    (Method::DELETE, "/api/v1/apikey/{}"),
    (Method::POST, "/api/v1/device/approve"),
    (Method::POST, "/api/v1/device/deny"),
    (Method::DELETE, "/api/v1/node/register/{}"),
    (Method::POST, "/oauth/device/code"),
    (Method::POST, "/oauth/token"),
    (Method::GET, "/device"),
    (Method::GET, "/register/{}"),
    (Method::GET, "/key"),
    (Method::POST, "/ts2021"),
];

/// Server state lives across inputs (so the fuzzer can build users, keys and nodes up), but is
/// rebuilt every so often so memory stays bounded. The router is built with it: building one
/// per input cost more than the request itself.
struct World {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    uses: u32,
}

fn world() -> nexus_sim::Shared {
    nexus_sim::build(nexus_sim::Config { api_keys: vec![KEY.to_string()], ..Default::default() })
        .expect("nexus-sim builds")
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

fn path_for(template: &str, params: &[u8]) -> String {
    let mut parts = params.split(|&b| b == b'/');
    let mut out = String::new();
    for (i, piece) in template.split("{}").enumerate() {
        if i > 0 {
            for &b in parts.next().unwrap_or(b"1") {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
        out.push_str(piece);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let (method, template) = &ROUTES[usize::from(which & 0x7f) % ROUTES.len()];
    let authed = which & 0x80 == 0;
    let (params, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b""[..], rest),
    };
    let mut req = Request::builder().method(method.clone()).uri(path_for(template, params));
    req = req.header("content-type", "application/json");
    if authed {
        req = req.header("authorization", format!("Bearer {KEY}"));
    }
    let req = req.body(Body::from(body.to_vec())).expect("request builds");
    WORLD.with(|w| {
        let mut w = w.borrow_mut();
        if w.as_ref().is_none_or(|w| w.uses >= 2000) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            *w = Some(World { rt, app: nexus_sim::router(world()), uses: 0 });
        }
        let w = w.as_mut().expect("world");
        w.uses += 1;
        let resp = w.rt.block_on(w.app.clone().oneshot(req)).expect("infallible");
        assert_ne!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR, "{method} {template} answered 500");
    });
});
