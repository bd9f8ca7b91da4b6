//! The consumer-group loop and the life of one job.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use citadel_proto::backoff::Backoff;
use tokio::sync::mpsc;
use tokio::task::{Id as TaskId, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use super::client::{RedisClient, RedisError, RedisTarget};
use super::exec::{self, Chunk, Limits, Report};
use super::job::{self, Job};
use super::resp::Value;
use super::{Dial, WorkConfig, WorkError, WorkSummary};

/// Builds a command from string-ish and byte parts.
macro_rules! cmd {
    ($($a:expr),* $(,)?) => { vec![$(AsRef::<[u8]>::as_ref(&$a).to_vec()),*] };
}

/// One stream entry as delivered by XREADGROUP / XAUTOCLAIM.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    /// Why the entry is refused unread (it exceeds the entry limits); its fields then hold
    /// only a short `jobId`, so the dead letter does not copy the bulk.
    too_large: Option<String>,
}

/// Most fields one job entry may have; real jobs use a handful.
const MAX_ENTRY_FIELDS: usize = 64;
/// Most bytes (names and values) one job entry may hold.
const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// How one delivery of a job ended, as seen by the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    /// Failed; left pending so a later XAUTOCLAIM retries it.
    Retry,
    Dead,
    /// The result could not be written/acknowledged (Redis trouble); the entry stays pending
    /// and is retried after `claim_idle` like a failure.
    Unrecorded,
    /// Another worker took the entry over (this one stalled past `claim_idle`) or already
    /// recorded its result: this delivery neither ran nor wrote anything after finding out.
    Superseded,
}

/// Shared, read-only state of a running worker.
struct Ctx {
    cfg: WorkConfig,
    redis: RedisClient,
    dialer: Arc<dyn Dial>,
    dead_key: String,
}

impl Ctx {
    fn status_key(&self, job_id: &str) -> String {
        format!("{}:job:{}", self.cfg.queue, job_id)
    }
    fn events_key(&self, job_id: &str) -> String {
        format!("{}:job:{}:events", self.cfg.queue, job_id)
    }
}

/// Bounds event streams so a runaway job cannot grow Redis without limit (approximate trim
/// is O(1) amortized).
const EVENTS_MAXLEN: &str = "10000";
/// Largest single output event; bigger bursts are split.
const EVENT_CHUNK: usize = 64 * 1024;

/// Runs the job loop until `shutdown` resolves, then drains in-flight jobs for up to
/// `cfg.drain_timeout` and returns what was done.
///
/// Fails only at startup: bad config or URL, Redis unreachable within `cfg.connect_timeout`,
/// or the queue key holding something that is not a stream. Once running, Redis outages are
/// logged and retried with backoff until shutdown.
pub async fn run(
    cfg: WorkConfig,
    dialer: Arc<dyn Dial>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<WorkSummary, WorkError> {
    validate(&cfg)?;
    let target = RedisTarget::parse(&cfg.redis_url)?;
    tokio::pin!(shutdown);
    let ctx = Arc::new(Ctx {
        redis: RedisClient::new(target.clone(), dialer.clone(), cfg.connect_timeout),
        dead_key: format!("{}:dead", cfg.queue),
        dialer: dialer.clone(),
        cfg,
    });
    // A second connection for the blocking XREADGROUP, so job status writes never queue
    // behind a read that is parked for `block`.
    let reader = RedisClient::new(target.clone(), dialer, ctx.cfg.connect_timeout);
    let mut summary = WorkSummary::default();

    tokio::select! {
        r = setup(&ctx) => r?,
        _ = &mut shutdown => return Ok(summary),
    }
    tracing::info!(
        redis = %target, queue = %ctx.cfg.queue, group = %ctx.cfg.group, consumer = %ctx.cfg.consumer,
        max_concurrency = ctx.cfg.max_concurrency, max_retries = ctx.cfg.max_retries,
        "work: consuming jobs"
    );

    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    // Which stream entry each task runs, so a reclaim never starts a second copy of a job this
    // worker is already running, and a panicked task can still be accounted for.
    let mut running: HashMap<TaskId, String> = HashMap::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let claim_every = (ctx.cfg.claim_idle / 2).clamp(Duration::from_millis(20), Duration::from_secs(10));
    let mut next_claim = Instant::now();
    let mut cursor = "0-0".to_string();
    let mut backoff = redis_backoff();

    loop {
        while let Some(r) = tasks.try_join_next_with_id() {
            finished(Some(r), &mut running, &mut in_flight, &mut summary);
        }
        let free = ctx.cfg.max_concurrency.saturating_sub(tasks.len());
        if free == 0 {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                r = tasks.join_next_with_id() => finished(r, &mut running, &mut in_flight, &mut summary),
            }
            continue;
        }

        // Reclaim first: entries that have waited claim_idle are older than anything new.
        if Instant::now() >= next_claim {
            // Not raced against shutdown: a cancelled XAUTOCLAIM could have claimed entries we
            // would then never run. It does not block, so this costs at most one round trip.
            let claim = reclaim(&ctx, &reader, &cursor, free).await;
            match claim {
                Ok((next_cursor, claimed)) => {
                    backoff.reset();
                    if next_cursor == "0-0" {
                        next_claim = Instant::now() + claim_every;
                    }
                    cursor = next_cursor;
                    for (entry, deliveries) in claimed {
                        if in_flight.contains(&entry.id) {
                            continue;
                        }
                        summary.reclaimed += 1;
                        spawn_job(&ctx, &mut tasks, &mut running, &mut in_flight, entry, deliveries);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "work: reclaim failed");
                    next_claim = Instant::now() + claim_every;
                    reader.reset().await;
                }
            }
            continue;
        }

        // BLOCK 0 would mean "forever", so never ask for less than a millisecond.
        let until_claim = next_claim.saturating_duration_since(Instant::now());
        let block = ctx.cfg.block.min(until_claim).max(Duration::from_millis(1));
        let read_fut = read_new(&ctx, &reader, free, block);
        tokio::pin!(read_fut);
        let read = tokio::select! {
            biased;
            _ = &mut shutdown => {
                stop_reading(&ctx, &reader, read_fut).await;
                break;
            }
            r = &mut read_fut => r,
        };
        match read {
            Ok(entries) => {
                backoff.reset();
                for entry in entries {
                    spawn_job(&ctx, &mut tasks, &mut running, &mut in_flight, entry, 1);
                }
            }
            Err(e) => {
                if matches!(&e, RedisError::Server(m) if m.starts_with("NOGROUP")) {
                    // Someone deleted the stream or group under us: recreate and carry on.
                    tracing::warn!("work: consumer group vanished; recreating it");
                    let _ = setup(&ctx).await;
                } else {
                    tracing::warn!(error = %e, "work: reading jobs failed; retrying");
                }
                reader.reset().await;
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }

    drain(&ctx, &mut tasks, &mut running, &mut in_flight, &mut summary).await;
    tracing::info!(?summary, "work: stopped");
    Ok(summary)
}

/// The shutdown drain: no new reads; running jobs get until `drain_timeout`, then the rest are
/// aborted and released for reclaim.
async fn drain(
    ctx: &Ctx,
    tasks: &mut JoinSet<Outcome>,
    running: &mut HashMap<TaskId, String>,
    in_flight: &mut HashSet<String>,
    summary: &mut WorkSummary,
) {
    let mut abandoned = Vec::new();
    let deadline = Instant::now() + ctx.cfg.drain_timeout;
    if !tasks.is_empty() {
        tracing::info!(in_flight = tasks.len(), drain_timeout = ?ctx.cfg.drain_timeout, "work: shutting down, draining jobs");
    }
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next_with_id()).await {
            Ok(r) => finished(r, running, in_flight, summary),
            Err(_) => {
                summary.abandoned = tasks.len() as u64;
                tracing::warn!(
                    abandoned = tasks.len(),
                    "work: drain timeout; abandoning jobs (they stay pending and will be reclaimed)"
                );
                abandoned.extend(running.values().cloned());
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    // They did start, so they keep their attempt count; they only skip the idle wait.
    release(ctx, &abandoned, false).await;
}

/// Ends a parked XREADGROUP on shutdown without losing what it may deliver.
///
/// Dropping the read would be simplest, but if Redis had already handed it entries those would
/// sit in this consumer's pending list, unrun, until `claim_idle` passes. So the read is woken
/// with `CLIENT UNBLOCK` (it then returns nothing), and anything it did return is released.
async fn stop_reading(
    ctx: &Ctx,
    reader: &RedisClient,
    read: Pin<&mut impl Future<Output = Result<Vec<Entry>, RedisError>>>,
) {
    let Some(id) = reader.connection_id() else {
        return;
    };
    if let Err(e) = ctx.redis.cmd(&["CLIENT", "UNBLOCK", &id.to_string()]).await {
        tracing::debug!(error = %e, "work: could not unblock the job read");
        return;
    }
    // After UNBLOCK the reply is immediate; the bound only guards against a stuck link.
    if let Ok(Ok(entries)) = tokio::time::timeout(Duration::from_secs(2), read).await {
        let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
        release(ctx, &ids, true).await;
    }
}

/// Hands pending entries of this consumer back to the group at once: their idle time is set so
/// large that the next XAUTOCLAIM of any worker takes them, instead of after `claim_idle`.
/// `never_started` entries also get their delivery count reset so the hand-back does not use
/// up one of their attempts.
async fn release(ctx: &Ctx, ids: &[String], never_started: bool) {
    if ids.is_empty() {
        return;
    }
    let c = &ctx.cfg;
    // ~49 days: beyond any sensible claim_idle.
    let idle = u32::MAX.to_string();
    let cmds = ids
        .iter()
        .map(|id| {
            let mut x = cmd!("XCLAIM", c.queue, c.group, c.consumer, "0", id, "IDLE", idle);
            if never_started {
                x.extend(cmd!("RETRYCOUNT", "0"));
            }
            x.extend(cmd!("JUSTID"));
            // Only entries this consumer still holds: another worker's claim is left alone.
            guarded(ctx, id, Holder::Me, vec![x])
        })
        .collect();
    match ctx.redis.pipeline(cmds).await {
        Ok(_) => tracing::info!(entries = ids.len(), "work: released pending jobs for immediate reclaim"),
        Err(e) => {
            tracing::warn!(error = %e, "work: could not release pending jobs; they will be reclaimed after claim_idle")
        }
    }
}

/// Books a finished job task into the summary and forgets which entry it was running.
fn finished(
    r: Option<Result<(TaskId, Outcome), tokio::task::JoinError>>,
    running: &mut HashMap<TaskId, String>,
    in_flight: &mut HashSet<String>,
    summary: &mut WorkSummary,
) {
    let (id, outcome) = match r {
        None => return,
        Some(Ok((id, o))) => (id, Some(o)),
        Some(Err(e)) => {
            // A job task only ends in error if it panicked (a bug); its entry stays pending,
            // so it is retried like a crash.
            tracing::error!(error = %e, "work: job task failed");
            (e.id(), None)
        }
    };
    if let Some(entry) = running.remove(&id) {
        in_flight.remove(&entry);
    }
    match outcome {
        Some(Outcome::Succeeded) => summary.succeeded += 1,
        Some(Outcome::Retry) | Some(Outcome::Unrecorded) | None => summary.failed_attempts += 1,
        Some(Outcome::Dead) => summary.dead_lettered += 1,
        Some(Outcome::Superseded) => summary.superseded += 1,
    }
}

fn validate(cfg: &WorkConfig) -> Result<(), WorkError> {
    let bad = |s: &str| Err(WorkError::Config(s.to_string()));
    if cfg.queue.is_empty() || cfg.group.is_empty() || cfg.consumer.is_empty() {
        return bad("queue, group and consumer must be non-empty");
    }
    if cfg.max_retries == 0 {
        return bad("max_retries must be at least 1");
    }
    if cfg.max_concurrency == 0 {
        return bad("max_concurrency must be at least 1");
    }
    if cfg.claim_idle.is_zero() || cfg.job_timeout.is_zero() || cfg.connect_timeout.is_zero() || cfg.block.is_zero() {
        return bad("claim_idle, job_timeout, connect_timeout and block must be non-zero");
    }
    Ok(())
}

/// Connects (bounded by `connect_timeout`) and makes sure the stream and group exist.
async fn setup(ctx: &Ctx) -> Result<(), WorkError> {
    let unreachable =
        |e: RedisError| WorkError::RedisUnreachable { target: ctx.redis.target().to_string(), reason: e.to_string() };
    ctx.redis.ping().await.map_err(unreachable)?;
    // Start at 0 so jobs enqueued before the first worker ever started are not skipped.
    match ctx.redis.cmd(&["XGROUP", "CREATE", &ctx.cfg.queue, &ctx.cfg.group, "0", "MKSTREAM"]).await {
        Ok(_) => Ok(()),
        Err(RedisError::Server(m)) if m.starts_with("BUSYGROUP") => Ok(()),
        Err(RedisError::Server(m)) => {
            Err(WorkError::Setup(format!("creating group {} on {}: {m}", ctx.cfg.group, ctx.cfg.queue)))
        }
        Err(e) => Err(unreachable(e)),
    }
}

async fn read_new(ctx: &Ctx, reader: &RedisClient, count: usize, block: Duration) -> Result<Vec<Entry>, RedisError> {
    let c = &ctx.cfg;
    let count = count.to_string();
    let block_ms = block.as_millis().max(1).to_string();
    let args =
        ["XREADGROUP", "GROUP", &c.group, &c.consumer, "COUNT", &count, "BLOCK", &block_ms, "STREAMS", &c.queue, ">"];
    // The reply may legitimately take the whole block time; allow for slow links on top.
    let reply = reader.cmd_timeout(&args, block + Duration::from_secs(10)).await?;
    let mut out = Vec::new();
    for stream in reply.as_array().unwrap_or_default() {
        let Some(entries) = stream.as_array().and_then(|a| a.get(1)) else {
            return Err(unexpected("XREADGROUP", &reply));
        };
        for e in entries.as_array().unwrap_or_default() {
            match parse_entry(e) {
                Some(Ok(entry)) => out.push(entry),
                // An entry deleted (XDEL/trim) after delivery has no fields: nothing to run.
                Some(Err(id)) => ack_quietly(ctx, &id).await,
                None => return Err(unexpected("XREADGROUP", e)),
            }
        }
    }
    Ok(out)
}

/// One XAUTOCLAIM step plus the delivery count of each claimed entry (XAUTOCLAIM increments
/// it but does not report it, so it is read back with XPENDING in the same round trip).
async fn reclaim(
    ctx: &Ctx,
    reader: &RedisClient,
    cursor: &str,
    count: usize,
) -> Result<(String, Vec<(Entry, u64)>), RedisError> {
    let c = &ctx.cfg;
    let idle = c.claim_idle.as_millis().to_string();
    let count = count.to_string();
    let reply = reader.cmd(&["XAUTOCLAIM", &c.queue, &c.group, &c.consumer, &idle, cursor, "COUNT", &count]).await?;
    let parts = reply.as_array().unwrap_or_default();
    let (Some(next), Some(entries)) = (parts.first().and_then(Value::as_str), parts.get(1).and_then(Value::as_array))
    else {
        return Err(unexpected("XAUTOCLAIM", &reply));
    };
    let mut claimed = Vec::new();
    for e in entries {
        match parse_entry(e) {
            Some(Ok(entry)) => claimed.push(entry),
            Some(Err(id)) => ack_quietly(ctx, &id).await,
            None => {} // Redis 6.2 reports deleted entries as nil; nothing to run.
        }
    }
    if claimed.is_empty() {
        return Ok((next.to_string(), vec![]));
    }
    let cmds = claimed
        .iter()
        .map(|e| {
            [b"XPENDING".as_slice(), c.queue.as_bytes(), c.group.as_bytes(), e.id.as_bytes(), e.id.as_bytes(), b"1"]
                .iter()
                .map(|a| a.to_vec())
                .collect()
        })
        .collect();
    let counts = reader.pipeline(cmds).await?;
    let with_counts = claimed
        .into_iter()
        .zip(counts)
        .map(|(e, v)| {
            // [[id, consumer, idle, deliveries]]; if the entry vanished meanwhile, treat it as a
            // fresh claim rather than guessing high and dead-lettering it.
            let n = v
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_array)
                .and_then(|p| p.get(3))
                .and_then(Value::as_int);
            (e, n.and_then(|n| u64::try_from(n).ok()).unwrap_or(1).max(1))
        })
        .collect();
    Ok((next.to_string(), with_counts))
}

/// `[id, [f1, v1, ...]]` → entry; `[id, nil]` → `Err(id)` (deleted); anything else → `None`.
fn parse_entry(v: &Value) -> Option<Result<Entry, String>> {
    let a = v.as_array()?;
    let id = a.first()?.as_str()?.to_string();
    let fields = match a.get(1)? {
        Value::Nil => return Some(Err(id)),
        Value::Array(flat) => {
            let bytes: usize = flat.iter().map(|v| v.as_bytes().map_or(0, <[u8]>::len)).sum();
            if flat.len() / 2 > MAX_ENTRY_FIELDS || bytes > MAX_ENTRY_BYTES {
                let reason = format!(
                    "entry too large ({} fields, {bytes} bytes; limits {MAX_ENTRY_FIELDS} fields, {MAX_ENTRY_BYTES} bytes)",
                    flat.len() / 2
                );
                let job_id = flat
                    .chunks(2)
                    .find(|kv| kv[0].as_bytes() == Some(b"jobId"))
                    .and_then(|kv| kv.get(1)?.as_bytes())
                    .filter(|v| v.len() <= 200)
                    .map(|v| ("jobId".to_string(), v.to_vec()));
                return Some(Ok(Entry { id, fields: job_id.into_iter().collect(), too_large: Some(reason) }));
            }
            flat.chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((String::from_utf8_lossy(k.as_bytes()?).into_owned(), v.as_bytes()?.to_vec())),
                    _ => None,
                })
                .collect()
        }
        _ => return None,
    };
    Some(Ok(Entry { id, fields, too_large: None }))
}

async fn ack_quietly(ctx: &Ctx, id: &str) {
    if let Err(e) = ctx.redis.cmd(&["XACK", &ctx.cfg.queue, &ctx.cfg.group, id]).await {
        tracing::debug!(entry = id, error = %e, "work: ack of deleted entry failed");
    }
}

fn unexpected(cmd: &'static str, v: &Value) -> RedisError {
    let mut detail = format!("{v:?}");
    detail.truncate(200);
    RedisError::Unexpected { cmd, detail }
}

fn spawn_job(
    ctx: &Arc<Ctx>,
    tasks: &mut JoinSet<Outcome>,
    running: &mut HashMap<TaskId, String>,
    in_flight: &mut HashSet<String>,
    entry: Entry,
    deliveries: u64,
) {
    let id = entry.id.clone();
    let handle = tasks.spawn(process(ctx.clone(), entry, deliveries));
    running.insert(handle.id(), id.clone());
    in_flight.insert(id);
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The whole life of one delivery: parse, record running, execute with heartbeats and output
/// streaming, record the result, then ack / leave pending / dead-letter.
async fn process(ctx: Arc<Ctx>, entry: Entry, deliveries: u64) -> Outcome {
    let max = u64::from(ctx.cfg.max_retries);
    if let Some(reason) = &entry.too_large {
        let id = job::best_effort_id(&entry.fields, &entry.id);
        tracing::warn!(entry = %entry.id, job = %id, "work: {reason}, dead-lettering");
        return dead_letter(&ctx, &entry, &id, deliveries, reason).await;
    }
    let job = match job::parse(&entry.fields, &entry.id) {
        Ok(j) => j,
        Err(m) => {
            let id = job::best_effort_id(&entry.fields, &entry.id);
            tracing::warn!(entry = %entry.id, job = %id, reason = %m, "work: malformed job, dead-lettering");
            return dead_letter(&ctx, &entry, &id, deliveries, &m.to_string()).await;
        }
    };
    if matches!(job.kind, job::JobKind::Shell { .. }) && !ctx.cfg.allow_shell {
        let reason = "SHELL_COMMAND jobs are disabled on this node (start `citadel work --allow-shell` to allow them)";
        tracing::warn!(job = %job.id, "work: {reason}");
        return dead_letter(&ctx, &entry, &job.id, deliveries, reason).await;
    }
    if deliveries > max {
        // Only reachable when earlier deliveries never reported back (worker crash, or
        // Redis down at completion), because a finished failure at `max` is dead-lettered
        // right away.
        let reason = format!("gave up after {max} attempts without a recorded result (worker lost mid-job?)");
        tracing::warn!(job = %job.id, deliveries, "work: {reason}");
        return dead_letter(&ctx, &entry, &job.id, deliveries, &reason).await;
    }
    let key = ctx.status_key(&job.id);
    let events = ctx.events_key(&job.id);
    let c = &ctx.cfg;
    let attempts = deliveries.to_string();
    let started = now();
    tracing::debug!(job = %job.id, kind = job.kind.type_name(), attempt = deliveries, "work: job started");
    // Clear result fields of a previous attempt so the hash never mixes two attempts.
    let mut start = vec![
        cmd!(
            "HDEL",
            key,
            "error",
            "exit_code",
            "http_status",
            "finished_at",
            "stdout_bytes",
            "stderr_bytes",
            "body_bytes",
            "truncated",
            "via"
        ),
        cmd!(
            "HSET",
            key,
            "state",
            "running",
            "attempts",
            attempts,
            "worker",
            c.consumer,
            "type",
            job.kind.type_name(),
            "message_id",
            entry.id,
            "started_at",
            started,
            "updated_at",
            started
        ),
        status_event(&events, "running", &[("attempt", &attempts), ("worker", &c.consumer)], &started),
    ];
    start.extend(expire_cmds(&ctx, &key, &events));
    match if_pending(&ctx, &entry.id, Holder::Me, start).await {
        Ok(true) => {}
        Ok(false) => {
            // Between the read and now this worker stalled past `claim_idle`: another one
            // holds the entry (and may have finished it). Running it here would run it twice
            // and could write "running" over a recorded result.
            tracing::info!(job = %job.id, attempt = deliveries, "work: job taken over by another worker before it started here; skipping");
            return Outcome::Superseded;
        }
        // Status is advisory; the job still runs and its ack decides its fate.
        Err(e) => tracing::warn!(job = %job.id, error = %e, "work: could not record job start"),
    }

    let report = execute(&ctx, &entry.id, &job, &events).await;

    let finished = now();
    let mut hset = cmd!("HSET", key, "finished_at", finished, "updated_at", finished);
    for (k, v) in &report.fields {
        hset.push(k.as_bytes().to_vec());
        hset.push(v.as_bytes().to_vec());
    }
    match report.error {
        None => {
            hset.extend(cmd!("state", "succeeded"));
            let mut tx = vec![hset, status_event(&events, "succeeded", &[("attempt", &attempts)], &finished)];
            tx.extend(expire_cmds(&ctx, &key, &events));
            // Ack in the same script as the result, so "acked" implies "result recorded". Any
            // holder: a success is a result even if another worker has since claimed the
            // entry, but once the entry is acked (a result is recorded) nothing is written.
            tx.push(cmd!("XACK", c.queue, c.group, entry.id));
            match if_pending(&ctx, &entry.id, Holder::Anyone, tx).await {
                Ok(true) => {
                    tracing::debug!(job = %job.id, attempt = deliveries, "work: job succeeded");
                    Outcome::Succeeded
                }
                Ok(false) => {
                    tracing::info!(job = %job.id, attempt = deliveries, "work: job succeeded, but another worker already recorded its result");
                    Outcome::Superseded
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "work: job succeeded but result not recorded; it will run again");
                    Outcome::Unrecorded
                }
            }
        }
        Some(err) if deliveries >= max => {
            tracing::warn!(job = %job.id, attempt = deliveries, error = %err, "work: job failed on its last attempt");
            // Keep exit code / HTTP status in the hash; dead_letter sets the state.
            dead_letter_with(&ctx, &entry, &job.id, deliveries, &err, vec![hset]).await
        }
        Some(err) => {
            tracing::info!(job = %job.id, attempt = deliveries, max_attempts = max, error = %err, "work: job failed; will retry");
            hset.extend(cmd!("state", "failed", "error", err));
            let retry_in = format!("{}", c.claim_idle.as_millis());
            let mut cmds = vec![
                hset,
                status_event(
                    &events,
                    "failed",
                    &[("attempt", &attempts), ("error", &err), ("retry_in_ms", &retry_in)],
                    &finished,
                ),
            ];
            cmds.extend(expire_cmds(&ctx, &key, &events));
            match if_pending(&ctx, &entry.id, Holder::Me, cmds).await {
                Ok(true) => Outcome::Retry,
                // Another worker holds the entry now; its attempt owns the status.
                Ok(false) => Outcome::Superseded,
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "work: could not record failure");
                    Outcome::Retry
                }
            }
        }
    }
}

/// XADD of one `status` event to a job's events stream: `state`, then `fields`, then `at`.
fn status_event(events: &str, state: &str, fields: &[(&str, &str)], at: &str) -> Vec<Vec<u8>> {
    let mut x = cmd!("XADD", events, "MAXLEN", "~", EVENTS_MAXLEN, "*", "type", "status", "state", state);
    for (k, v) in fields {
        x.extend(cmd!(k, v));
    }
    x.extend(cmd!("at", at));
    x
}

fn expire_cmds(ctx: &Ctx, key: &str, events: &str) -> Vec<Vec<Vec<u8>>> {
    match ctx.cfg.result_ttl {
        None => vec![],
        Some(ttl) => {
            let secs = ttl.as_secs().max(1).to_string();
            vec![cmd!("EXPIRE", key, secs), cmd!("EXPIRE", events, secs)]
        }
    }
}

/// Who must hold a pending entry for [`if_pending`] to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// This worker's consumer: the entry was not claimed by another worker since.
    Me,
    /// Any consumer: the entry is still pending, i.e. no result has been recorded for it.
    Anyone,
}

/// Runs `cmds` atomically, but only while the stream entry is pending (held by this consumer
/// for [`Holder::Me`]); returns whether they ran.
///
/// Written as a server-side script because Redis has no conditional transaction on a pending
/// entry (WATCH does not see the pending list), and a worker that stalls past `claim_idle`
/// must not write over the status of a delivery another worker has taken over or finished.
/// The script reads its commands as `argc, args...` groups; it touches the job's status keys
/// beside the stream, so it assumes one Redis server, not a cluster.
async fn if_pending(ctx: &Ctx, entry_id: &str, holder: Holder, cmds: Vec<Vec<Vec<u8>>>) -> Result<bool, RedisError> {
    match ctx.redis.cmd(&guarded(ctx, entry_id, holder, cmds)).await? {
        Value::Int(1) => Ok(true),
        Value::Int(0) => Ok(false),
        v => Err(unexpected("EVAL", &v)),
    }
}

/// The EVAL command behind [`if_pending`].
fn guarded(ctx: &Ctx, entry_id: &str, holder: Holder, cmds: Vec<Vec<Vec<u8>>>) -> Vec<Vec<u8>> {
    const SCRIPT: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)[1]
if p == nil or p[1] ~= ARGV[2] or (ARGV[3] ~= '' and p[2] ~= ARGV[3]) then return 0 end
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"#;
    let c = &ctx.cfg;
    let holder = match holder {
        Holder::Me => c.consumer.as_str(),
        Holder::Anyone => "",
    };
    let mut x = cmd!("EVAL", SCRIPT, "1", c.queue, c.group, entry_id, holder);
    for args in cmds {
        x.push(args.len().to_string().into_bytes());
        x.extend(args);
    }
    x
}

/// Moves the entry to `<queue>:dead` (original fields kept, so it can be re-queued by copying
/// them back) and acks it, atomically, unless a result was recorded for it meanwhile.
async fn dead_letter(ctx: &Ctx, entry: &Entry, job_id: &str, attempts: u64, reason: &str) -> Outcome {
    dead_letter_with(ctx, entry, job_id, attempts, reason, vec![]).await
}

/// [`dead_letter`], running `first` (the last attempt's result fields) in the same script.
async fn dead_letter_with(
    ctx: &Ctx,
    entry: &Entry,
    job_id: &str,
    attempts: u64,
    reason: &str,
    first: Vec<Vec<Vec<u8>>>,
) -> Outcome {
    let c = &ctx.cfg;
    let at = now();
    let attempts = attempts.to_string();
    const META: [&str; 7] =
        ["reason", "attempts", "original_message_id", "original_queue", "worker_id", "moved_at", "jobId"];
    let mut xadd = cmd!("XADD", ctx.dead_key, "*");
    for (k, v) in &entry.fields {
        if !META.contains(&k.as_str()) {
            xadd.push(k.as_bytes().to_vec());
            xadd.push(v.clone());
        }
    }
    xadd.extend(cmd!(
        "jobId",
        job_id,
        "reason",
        reason,
        "attempts",
        attempts,
        "original_message_id",
        entry.id,
        "original_queue",
        c.queue,
        "worker_id",
        c.consumer,
        "moved_at",
        at
    ));
    let key = ctx.status_key(job_id);
    let events = ctx.events_key(job_id);
    let mut tx = first;
    tx.extend([
        xadd,
        cmd!(
            "HSET",
            key,
            "state",
            "dead",
            "error",
            reason,
            "attempts",
            attempts,
            "worker",
            c.consumer,
            "message_id",
            entry.id,
            "updated_at",
            at
        ),
        status_event(&events, "dead", &[("error", reason)], &at),
    ]);
    tx.extend(expire_cmds(ctx, &key, &events));
    tx.push(cmd!("XACK", c.queue, c.group, entry.id));
    match if_pending(ctx, &entry.id, Holder::Anyone, tx).await {
        Ok(true) => Outcome::Dead,
        Ok(false) => {
            tracing::info!(job = %job_id, "work: not dead-lettered: another worker already recorded a result");
            Outcome::Superseded
        }
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "work: dead-lettering failed; will try again after claim_idle");
            Outcome::Unrecorded
        }
    }
}

/// Runs the job while (a) streaming its output into the event stream and (b) refreshing the
/// pending entry's idle time, so XAUTOCLAIM elsewhere only takes it if this worker dies.
async fn execute(ctx: &Arc<Ctx>, entry_id: &str, job: &Job, events: &str) -> Report {
    let limits = Limits { timeout: job.timeout.unwrap_or(ctx.cfg.job_timeout), max_output: ctx.cfg.max_output_bytes };
    let (tx, mut rx) = mpsc::channel::<Chunk>(64);
    let run = exec::run(&job.kind, ctx.dialer.clone(), limits, &ctx.cfg.allow_fetch, tx);
    tokio::pin!(run);
    let beat = (ctx.cfg.claim_idle / 3).max(Duration::from_millis(10));
    let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let report = loop {
        tokio::select! {
            r = &mut run => break r,
            Some(first) = rx.recv() => forward_output(ctx, events, first, &mut rx).await,
            _ = heartbeat.tick() => {
                // JUSTID: refresh idle time without bumping the delivery (attempt) counter.
                // Only while this consumer holds the entry: a plain XCLAIM would take back an
                // entry another worker claimed while this one stalled.
                let c = &ctx.cfg;
                let beat = cmd!("XCLAIM", c.queue, c.group, c.consumer, "0", entry_id, "JUSTID");
                if let Err(e) = if_pending(ctx, entry_id, Holder::Me, vec![beat]).await {
                    tracing::debug!(entry = entry_id, error = %e, "work: heartbeat failed");
                }
            }
        }
    };
    // Every send completed before `run` returned, so whatever is left is already buffered.
    while let Ok(first) = rx.try_recv() {
        forward_output(ctx, events, first, &mut rx).await;
    }
    report
}

/// Writes `first` plus whatever else is already queued, coalescing consecutive chunks of the
/// same stream so a program that writes byte by byte does not become one event per byte.
async fn forward_output(ctx: &Ctx, events: &str, first: Chunk, rx: &mut mpsc::Receiver<Chunk>) {
    let mut batches: Vec<(&'static str, Vec<u8>)> = vec![(first.stream, first.data.to_vec())];
    while let Ok(next) = rx.try_recv() {
        match batches.last_mut() {
            Some((s, buf)) if *s == next.stream && buf.len() + next.data.len() <= EVENT_CHUNK => {
                buf.extend_from_slice(&next.data)
            }
            _ => batches.push((next.stream, next.data.to_vec())),
        }
    }
    let cmds = batches
        .into_iter()
        .map(|(stream, data)| {
            cmd!("XADD", events, "MAXLEN", "~", EVENTS_MAXLEN, "*", "type", "output", "stream", stream, "data", data)
        })
        .collect();
    if let Err(e) = ctx.redis.pipeline(cmds).await {
        tracing::debug!(error = %e, "work: output event lost");
    }
}

/// Backoff for Redis outages: 100 ms doubling to 5 s.
fn redis_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}
