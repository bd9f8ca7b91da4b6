//! Job wire format: how a stream entry becomes a [`Job`], and why one is rejected.
//!
//! Two shapes are accepted so Citadel can share a queue with the Go agent's producers:
//! - Go-compatible fields (what the original `citadel work` reads): `jobId`, `type`, and
//!   `payload` holding a JSON object as a string (plus optional `enqueuedAt`, `rayId`).
//! - A single `job` field holding the whole document: `{"id", "type", "payload": {...}}`.
//!
//! Parsing never panics; every way a job can be unusable is a [`Malformed`] reason that the
//! worker dead-letters immediately, because retrying a job that cannot be parsed cannot help.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value as Json;

/// Job type that runs a program (argv, or a string split on whitespace; never a shell).
pub const SHELL_COMMAND: &str = "SHELL_COMMAND";
/// Job type that performs an HTTP GET.
pub const HTTP_FETCH: &str = "HTTP_FETCH";

/// Longest accepted job id; ids become Redis key names.
const MAX_ID_LEN: usize = 200;
/// Upper bound on a per-job timeout a producer may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A parsed, runnable job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Producer-assigned id (falls back to the stream entry id when absent).
    pub id: String,
    /// What to run.
    pub kind: JobKind,
    /// Per-job timeout override from the payload.
    pub timeout: Option<Duration>,
}

/// The work a job asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// Run `argv[0]` with `argv[1..]`, no shell involved.
    Shell {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables (on top of a small safe allowlist).
        env: BTreeMap<String, String>,
        /// Working directory.
        cwd: Option<String>,
    },
    /// GET an `http://` URL.
    HttpFetch {
        /// The URL.
        url: String,
    },
}

impl JobKind {
    /// The wire name of the job type.
    pub fn type_name(&self) -> &'static str {
        match self {
            JobKind::Shell { .. } => SHELL_COMMAND,
            JobKind::HttpFetch { .. } => HTTP_FETCH,
        }
    }
}

/// Why a job can never run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed job: {0}")]
pub struct Malformed(pub String);

fn bad(s: impl Into<String>) -> Malformed {
    Malformed(s.into())
}

/// The job id to record for an entry, even if the rest of it is malformed. Used so a broken
/// job still gets a status hash and a dead-letter entry that name it.
pub fn best_effort_id(fields: &[(String, Vec<u8>)], entry_id: &str) -> String {
    let from_fields = field(fields, "jobId").and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string);
    let from_doc = field(fields, "job")
        .and_then(|b| serde_json::from_slice::<Json>(b).ok())
        .and_then(|d| d.get("id").and_then(id_text));
    from_fields.or(from_doc).filter(|id| valid_id(id)).unwrap_or_else(|| entry_id.to_string())
}

/// Parses the field/value pairs of one stream entry.
pub fn parse(fields: &[(String, Vec<u8>)], entry_id: &str) -> Result<Job, Malformed> {
    let (id, ty, payload) = if let Some(doc) = field(fields, "job") {
        let doc: Json = serde_json::from_slice(doc).map_err(|e| bad(format!("`job` field is not valid JSON: {e}")))?;
        let Json::Object(mut doc) = doc else {
            return Err(bad("`job` field must be a JSON object"));
        };
        let id = match doc.get("id") {
            None | Some(Json::Null) => None,
            Some(v) => Some(id_text(v).ok_or_else(|| bad("`id` must be a string or number"))?),
        };
        let ty = match doc.get("type") {
            Some(Json::String(s)) => s.clone(),
            Some(_) => return Err(bad("`type` must be a string")),
            None => return Err(bad("missing `type`")),
        };
        (id, ty, doc.remove("payload").unwrap_or(Json::Null))
    } else {
        let text = |name: &str| -> Result<Option<String>, Malformed> {
            field(fields, name)
                .map(|b| String::from_utf8(b.to_vec()).map_err(|_| bad(format!("`{name}` is not UTF-8"))))
                .transpose()
        };
        let id = text("jobId")?;
        let ty = text("type")?;
        let payload = match field(fields, "payload") {
            Some(p) => serde_json::from_slice(p).map_err(|e| bad(format!("`payload` field is not valid JSON: {e}")))?,
            None => Json::Null,
        };
        // The Go producer sometimes puts the type inside the payload only.
        let ty = match ty {
            Some(t) => t,
            None => match payload.get("type") {
                Some(Json::String(s)) => s.clone(),
                _ => return Err(bad(
                    "missing `type` (expected a `type` field, or a `job` field holding {\"id\",\"type\",\"payload\"})",
                )),
            },
        };
        (id, ty, payload)
    };
    let id = id.unwrap_or_else(|| entry_id.to_string());
    if !valid_id(&id) {
        return Err(bad(format!("job id must be 1..={MAX_ID_LEN} printable characters")));
    }
    let payload = match payload {
        Json::Null => Json::Object(Default::default()),
        p @ Json::Object(_) => p,
        _ => return Err(bad("`payload` must be a JSON object")),
    };
    let common: Common = serde_json::from_value(payload.clone()).map_err(|e| bad(format!("bad payload: {e}")))?;
    let timeout = match common.timeout_secs {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t).min(MAX_TIMEOUT)),
        Some(_) => return Err(bad("`timeout_secs` must be a positive number")),
    };
    let kind = match ty.as_str() {
        SHELL_COMMAND => shell(payload)?,
        HTTP_FETCH => http(payload)?,
        other => return Err(bad(format!("unsupported job type {other:?} (supported: {SHELL_COMMAND}, {HTTP_FETCH})"))),
    };
    Ok(Job { id, kind, timeout })
}

#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    timeout_secs: Option<f64>,
}

#[derive(Deserialize)]
struct ShellPayload {
    #[serde(default)]
    argv: Option<Vec<String>>,
    #[serde(default)]
    command: Option<Json>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

fn shell(payload: Json) -> Result<JobKind, Malformed> {
    let p: ShellPayload =
        serde_json::from_value(payload).map_err(|e| bad(format!("bad {SHELL_COMMAND} payload: {e}")))?;
    let argv = match (p.argv, p.command) {
        (Some(argv), _) => argv,
        (None, Some(Json::Array(items))) => items
            .into_iter()
            .map(|v| match v {
                Json::String(s) => Ok(s),
                _ => Err(bad("`command` array must hold strings")),
            })
            .collect::<Result<_, _>>()?,
        // As the Go worker does (`strings.Fields`): split on Unicode whitespace, no quoting,
        // no shell; `["sh","-c","..."]` remains the way to ask for a shell.
        (None, Some(Json::String(cmd))) => {
            let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
            if argv.is_empty() {
                return Err(bad("`command` is empty"));
            }
            argv
        }
        (None, Some(_)) => return Err(bad("`command` must be a string or an array of strings")),
        (None, _) => return Err(bad(format!("{SHELL_COMMAND} needs `argv` (array of strings)"))),
    };
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err(bad("`argv` must start with a non-empty program name"));
    }
    if argv.iter().any(|a| a.contains('\0'))
        || p.env.iter().any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(bad("argv/env must not contain NUL bytes, and env names must be non-empty without '='"));
    }
    Ok(JobKind::Shell { argv, env: p.env, cwd: p.cwd })
}

#[derive(Deserialize)]
struct HttpPayload {
    url: String,
    #[serde(default)]
    method: Option<String>,
}

fn http(payload: Json) -> Result<JobKind, Malformed> {
    let p: HttpPayload = serde_json::from_value(payload).map_err(|e| bad(format!("bad {HTTP_FETCH} payload: {e}")))?;
    if let Some(m) = &p.method {
        if !m.eq_ignore_ascii_case("GET") {
            return Err(bad(format!("{HTTP_FETCH} supports only GET, not {m:?}")));
        }
    }
    // Validate now so a bad URL is dead-lettered at once instead of retried.
    super::exec::parse_http_url(&p.url).map_err(Malformed)?;
    Ok(JobKind::HttpFetch { url: p.url })
}

fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

fn id_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn parses_go_style_fields() {
        let j = parse(
            &f(&[
                ("jobId", "j1"),
                ("type", "SHELL_COMMAND"),
                ("payload", r#"{"argv":["echo","hi"],"timeout_secs":2}"#),
            ]),
            "1-0",
        )
        .unwrap();
        assert_eq!(j.id, "j1");
        assert_eq!(j.timeout, Some(Duration::from_secs(2)));
        assert!(matches!(j.kind, JobKind::Shell { ref argv, .. } if argv == &["echo", "hi"]));
    }

    #[test]
    fn parses_single_document_field() {
        let j = parse(
            &f(&[("job", r#"{"id":7,"type":"HTTP_FETCH","payload":{"url":"http://100.64.0.1:8080/x"}}"#)]),
            "1-0",
        )
        .unwrap();
        assert_eq!(j.id, "7");
        assert_eq!(j.kind, JobKind::HttpFetch { url: "http://100.64.0.1:8080/x".into() });
        let j = parse(&f(&[("job", r#"{"type":"SHELL_COMMAND","payload":{"command":["true"]}}"#)]), "5-1").unwrap();
        assert_eq!(j.id, "5-1");
    }

    #[test]
    fn string_command_is_split_on_whitespace_like_the_go_worker() {
        let argv = |cmd: &str| {
            let doc = serde_json::json!({"type": "SHELL_COMMAND", "payload": {"command": cmd}}).to_string();
            match parse(&f(&[("job", &doc)]), "1-0").unwrap().kind {
                JobKind::Shell { argv, .. } => argv,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(argv("echo  hello\tworld\n"), ["echo", "hello", "world"]);
        // No shell: quotes, variables and separators are plain characters of the words.
        assert_eq!(argv("echo '$HOME; rm' x"), ["echo", "'$HOME;", "rm'", "x"]);
        assert_eq!(argv("\u{a0}ls\u{2003}-l"), ["ls", "-l"]);
    }

    #[test]
    fn malformed_jobs_are_reasons_not_panics() {
        let cases: &[&[(&str, &str)]] = &[
            &[("job", "{not json")],
            &[("job", "[]")],
            &[("job", r#"{"id":"x"}"#)],
            &[("job", r#"{"id":"x","type":"NOPE"}"#)],
            &[("job", r#"{"id":"x","type":"SHELL_COMMAND","payload":{"command":" \t\n"}}"#)],
            &[("job", r#"{"id":"x","type":"SHELL_COMMAND","payload":{"command":""}}"#)],
            &[("job", r#"{"id":"x","type":"SHELL_COMMAND","payload":{"command":7}}"#)],
            &[("job", r#"{"id":"x","type":"SHELL_COMMAND","payload":{"argv":[]}}"#)],
            &[("job", r#"{"id":"x","type":"SHELL_COMMAND","payload":{"argv":["a"],"timeout_secs":-1}}"#)],
            &[("job", r#"{"id":"x","type":"HTTP_FETCH","payload":{"url":"ftp://h/"}}"#)],
            &[("job", r#"{"id":"x","type":"HTTP_FETCH","payload":{"url":"http://h/","method":"POST"}}"#)],
            &[("type", "SHELL_COMMAND"), ("payload", "{bad")],
            &[("payload", "{}")],
            &[],
        ];
        for c in cases {
            assert!(parse(&f(c), "1-0").is_err(), "{c:?}");
        }
        assert_eq!(best_effort_id(&f(&[("job", r#"{"id":"x"}"#)]), "1-0"), "x");
        assert_eq!(best_effort_id(&f(&[("job", "{")]), "1-0"), "1-0");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_documents_never_panic(s in ".{0,200}") {
            let fields = vec![("job".to_string(), s.clone().into_bytes()), ("payload".to_string(), s.into_bytes())];
            let _ = parse(&fields, "1-0");
            let _ = best_effort_id(&fields, "1-0");
        }
    }
}
