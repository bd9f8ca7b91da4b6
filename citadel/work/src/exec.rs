//! Running one job: a program (argv, no shell) or an HTTP GET, with bounded output that is
//! streamed to the caller as it arrives.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::job::JobKind;
use super::{dial_filtered, fetch_allowed, Dial};

/// A piece of job output: which stream it came from (`stdout`, `stderr`, `body`) and bytes.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub stream: &'static str,
    pub data: Bytes,
}

/// How a job run ended. `fields` go into the job's status hash.
#[derive(Debug)]
pub(crate) struct Report {
    /// `None` on success, else why it failed.
    pub error: Option<String>,
    pub fields: Vec<(&'static str, String)>,
}

/// Limits a run is held to.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub timeout: Duration,
    pub max_output: usize,
}

/// Runs `kind`, sending output to `out`. Never panics; every failure is a [`Report`].
pub(crate) async fn run(
    kind: &JobKind,
    dialer: Arc<dyn Dial>,
    limits: Limits,
    allow_fetch: &[ip_network::IpNetwork],
    out: mpsc::Sender<Chunk>,
) -> Report {
    match kind {
        JobKind::Shell { argv, env, cwd } => shell(argv, env, cwd.as_deref(), limits, out).await,
        JobKind::HttpFetch { url } => {
            let f = fetch(url, &*dialer, allow_fetch, limits.max_output, out);
            match tokio::time::timeout(limits.timeout, f).await {
                Ok(r) => r,
                Err(_) => Report { error: Some(format!("timed out after {:?}", limits.timeout)), fields: vec![] },
            }
        }
    }
}

/// Environment variables passed through from the agent to jobs. Everything else is dropped so
/// the agent's own secrets (a Redis password in `CITADEL_REDIS_URL`, auth keys) never reach a
/// job — the same allowlist idea as the Go agent's shell handler.
const ENV_ALLOW: &[&str] = &["PATH", "HOME", "LANG", "TERM", "TZ", "USER", "SHELL", "TMPDIR"];

/// Kills a job's whole process group when dropped unless disarmed, so a timeout, a shutdown
/// that gives up, or an aborted worker task leaves no orphaned grandchildren behind.
struct GroupKill(Option<i32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pgid) = self.0.take() {
            // SAFETY: plain syscall with integer arguments; a stale group id just yields ESRCH.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

async fn shell(
    argv: &[String],
    env: &std::collections::BTreeMap<String, String>,
    cwd: Option<&str>,
    limits: Limits,
    out: mpsc::Sender<Chunk>,
) -> Report {
    let fail = |e: String| Report { error: Some(e), fields: vec![] };
    let Some((prog, args)) = argv.split_first() else {
        return fail("empty argv".into());
    };
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .envs(
            std::env::vars_os()
                .filter(|(k, _)| k.to_str().is_some_and(|k| ENV_ALLOW.contains(&k) || k.starts_with("LC_"))),
        )
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Own process group so the whole tree can be killed on timeout. Elsewhere only the direct
    // child is killed (kill_on_drop).
    #[cfg(unix)]
    cmd.process_group(0);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {prog:?}: {e}")),
    };
    let mut guard = GroupKill(child.id().and_then(|p| i32::try_from(p).ok()));
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return fail("child has no stdout/stderr pipes".into());
    };
    let work = async {
        let (o, e, status) = tokio::join!(
            pump(stdout, "stdout", limits.max_output, &out),
            pump(stderr, "stderr", limits.max_output, &out),
            child.wait()
        );
        (o, e, status)
    };
    match tokio::time::timeout(limits.timeout, work).await {
        Err(_) => Report {
            error: Some(format!("timed out after {:?}; process group killed", limits.timeout)),
            fields: vec![],
        },
        Ok((o, e, status)) => {
            // Exited normally: leave any daemonized grandchildren alone (they were started on
            // purpose and have already released our pipes).
            guard.0 = None;
            let mut fields = vec![
                ("stdout_bytes", o.total.to_string()),
                ("stderr_bytes", e.total.to_string()),
                ("truncated", (o.truncated || e.truncated).to_string()),
            ];
            match status {
                Err(err) => Report { error: Some(format!("waiting for {prog:?}: {err}")), fields },
                Ok(st) => match st.code() {
                    Some(0) => {
                        fields.push(("exit_code", "0".into()));
                        Report { error: None, fields }
                    }
                    Some(c) => {
                        fields.push(("exit_code", c.to_string()));
                        Report { error: Some(format!("exited with status {c}")), fields }
                    }
                    None => Report { error: Some(format!("killed by signal ({st})")), fields },
                },
            }
        }
    }
}

#[derive(Default)]
struct Pumped {
    total: u64,
    truncated: bool,
}

/// Copies a pipe to `out` until EOF, forwarding at most `max` bytes and discarding (but still
/// draining) the rest, so a chatty job can neither fill Redis nor block on a full pipe.
async fn pump(mut r: impl AsyncRead + Unpin, stream: &'static str, max: usize, out: &mpsc::Sender<Chunk>) -> Pumped {
    let mut p = Pumped::default();
    let mut sent = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return p,
            Ok(n) => n,
        };
        p.total += n as u64;
        let take = n.min(max - sent);
        if take < n {
            p.truncated = true;
        }
        if take > 0 {
            sent += take;
            // A closed receiver only means nobody records output any more; keep draining.
            let _ = out.send(Chunk { stream, data: Bytes::copy_from_slice(&buf[..take]) }).await;
        }
    }
}

/// A validated `http://` URL split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpTarget {
    pub host: String,
    pub port: u16,
    /// Value of the Host header.
    pub authority: String,
    pub path_and_query: String,
}

/// Validates an HTTP_FETCH URL. Errors never echo credentials.
pub(crate) fn parse_http_url(url: &str) -> Result<HttpTarget, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https is not supported (plain http only; mesh traffic is already encrypted by WireGuard)".into()
            )
        }
        _ => return Err("URL must start with http://".into()),
    }
    let auth = uri.authority().ok_or("URL has no host")?;
    if auth.as_str().contains('@') {
        return Err("credentials in the URL are not supported".into());
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']').to_string();
    if host.is_empty() {
        return Err("URL has no host".into());
    }
    Ok(HttpTarget {
        host,
        port: auth.port_u16().unwrap_or(80),
        authority: auth.as_str().to_string(),
        path_and_query: uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()),
    })
}

async fn fetch(
    url: &str,
    dialer: &dyn Dial,
    allow: &[ip_network::IpNetwork],
    max_body: usize,
    out: mpsc::Sender<Chunk>,
) -> Report {
    let fail = |e: String, fields| Report { error: Some(e), fields };
    let t = match parse_http_url(url) {
        Ok(t) => t,
        Err(e) => return fail(e, vec![]),
    };
    let (io, via_mesh) = match dial_filtered(dialer, &t.host, t.port, |ip| fetch_allowed(ip, dialer, allow)).await {
        Ok(x) => x,
        Err(e) => return fail(format!("connect {}:{}: {e}", t.host, t.port), vec![]),
    };
    let mut fields = vec![("via", if via_mesh { "mesh" } else { "direct" }.to_string())];
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(x) => x,
        Err(e) => return fail(format!("http handshake: {e}"), fields),
    };
    // The connection driver lives exactly as long as this fetch: dropping the JoinHandle would
    // not stop it, so abort it explicitly when we are done (or cancelled).
    let driver = tokio::spawn(conn);
    let _stop = AbortOnDrop(driver);
    let req = match http::Request::get(t.path_and_query.as_str())
        .header(http::header::HOST, &t.authority)
        .header(http::header::USER_AGENT, concat!("citadel-work/", env!("CARGO_PKG_VERSION")))
        .header(http::header::CONNECTION, "close")
        .body(http_body_util::Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return fail(format!("building request: {e}"), fields),
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return fail(format!("request failed: {e}"), fields),
    };
    let status = resp.status();
    fields.push(("http_status", status.as_u16().to_string()));
    let mut body = resp.into_body();
    let (mut total, mut sent, mut truncated) = (0u64, 0usize, false);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                fields.push(("body_bytes", total.to_string()));
                return fail(format!("reading body: {e}"), fields);
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        let take = data.len().min(max_body - sent);
        if take > 0 {
            sent += take;
            let _ = out.send(Chunk { stream: "body", data: data.slice(..take) }).await;
        }
        if take < data.len() {
            // Stop reading: we will not record more, and the server may be streaming forever.
            truncated = true;
            break;
        }
    }
    fields.push(("body_bytes", total.to_string()));
    fields.push(("truncated", truncated.to_string()));
    if status.as_u16() >= 400 {
        return fail(format!("HTTP status {}", status.as_u16()), fields);
    }
    Report { error: None, fields }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_are_validated() {
        let t = parse_http_url("http://100.64.1.2:8080/a?b=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path_and_query.as_str(), t.authority.as_str()),
            ("100.64.1.2", 8080, "/a?b=1", "100.64.1.2:8080")
        );
        let t = parse_http_url("http://[fd7a:115c:a1e0::5]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd7a:115c:a1e0::5", 80));
        for bad in ["https://h/", "ftp://h/", "h/x", "http://u:pw@h/", "http:///x", ""] {
            let e = parse_http_url(bad).unwrap_err();
            assert!(!e.contains("pw"), "{bad}: {e}");
        }
    }
}
