//! Latency and jitter for `--real` on kernels without `tc netem` (`sch_netem`): iptables
//! `NFQUEUE` rules hand the packets to a thread of the harness, which holds each one for its
//! delay and then accepts it.
//!
//! [`Hold`] is the sans-IO scheduler (time and randomness passed in, unit tested); [`Delayer`]
//! is its loop over one namespace's netfilter queues, through the `nfq` crate. Packets of one
//! flow (protocol, addresses, ports) leave in the order they came, as a wire keeps them; the
//! queue is bounded like netem's (1000 packets): past it, packets are dropped.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long packets of one queue are held: `delay` plus a uniform draw in `[0, jitter]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Fixed part.
    pub delay: Duration,
    /// Width of the random part.
    pub jitter: Duration,
}

/// Packets held at once, over all queues of a namespace (netem's default limit).
pub const LIMIT: usize = 1000;

/// Flows whose last release time is remembered (older ones are forgotten once released).
const FLOWS_MAX: usize = 4096;

/// A flow of packets that must keep its order: IPv4 protocol, addresses and, for TCP/UDP, ports.
pub type Flow = (u8, [u8; 4], [u8; 4], u16, u16);

/// The flow of an IPv4 packet; `None` for anything shorter than a header.
pub fn flow_of(packet: &[u8]) -> Option<Flow> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let proto = packet[9];
    let addr = |o: usize| [packet[o], packet[o + 1], packet[o + 2], packet[o + 3]];
    let ports = match (proto, packet.get(ihl..ihl + 4)) {
        (6 | 17, Some(p)) => (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])),
        _ => (0, 0),
    };
    Some((proto, addr(12), addr(16), ports.0, ports.1))
}

/// Holds items until their release time; a flow's items leave in arrival order.
#[derive(Debug)]
pub struct Hold<T> {
    /// `(release, arrival sequence)` → item.
    held: BTreeMap<(Instant, u64), T>,
    /// Last release time given to each flow.
    flows: HashMap<Flow, Instant>,
    seq: u64,
    rng: StdRng,
    limit: usize,
}

impl<T> Hold<T> {
    /// An empty hold of at most `limit` items; `seed` drives the jitter.
    pub fn new(limit: usize, seed: u64) -> Self {
        Hold { held: BTreeMap::new(), flows: HashMap::new(), seq: 0, rng: StdRng::seed_from_u64(seed), limit }
    }

    /// Takes `item` of `flow` arriving at `now`; gives it back when the hold is full.
    pub fn push(&mut self, now: Instant, flow: Option<Flow>, spec: Spec, item: T) -> Result<Instant, T> {
        if self.held.len() >= self.limit {
            return Err(item);
        }
        let jitter =
            if spec.jitter.is_zero() { Duration::ZERO } else { spec.jitter.mul_f64(self.rng.gen_range(0.0..=1.0)) };
        let mut at = now + spec.delay + jitter;
        if let Some(f) = flow {
            if self.flows.len() >= FLOWS_MAX {
                self.flows.retain(|_, t| *t > now);
            }
            if let Some(prev) = self.flows.get(&f) {
                at = at.max(*prev);
            }
            if self.flows.len() < FLOWS_MAX || self.flows.contains_key(&f) {
                self.flows.insert(f, at);
            }
        }
        self.seq += 1;
        self.held.insert((at, self.seq), item);
        Ok(at)
    }

    /// Removes and returns every item due at `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(e) = self.held.first_entry() {
            if e.key().0 > now {
                break;
            }
            out.push(e.remove());
        }
        out
    }

    /// When the next item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.keys().next().map(|(t, _)| *t)
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Removes and returns everything, earliest first.
    pub fn drain(&mut self) -> Vec<T> {
        std::mem::take(&mut self.held).into_values().collect()
    }
}

/// Why a delayer could not start.
#[derive(Debug, thiserror::Error)]
pub enum DelayerError {
    /// Entering the namespace failed.
    #[error("entering network namespace {0}: {1}")]
    Netns(String, std::io::Error),
    /// Opening or binding the netfilter queue failed (no `nfnetlink_queue` in the kernel?).
    #[error("netfilter queue {0}: {1}")]
    Queue(u16, std::io::Error),
    /// The thread ended before saying whether it started.
    #[error("the delayer thread ended before it started")]
    Thread,
    /// Netfilter queues exist only on Linux.
    #[error("the NFQUEUE delayer needs Linux")]
    Unsupported,
}

/// What a delayer did so far, for the report of a failed run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Packets taken from the netfilter queues.
    pub queued: u64,
    /// Packets accepted after their hold.
    pub released: u64,
    /// Packets dropped because the hold was full ([`LIMIT`]).
    pub overflowed: u64,
    /// Verdicts the kernel refused (the packet is then gone or stuck in its queue).
    pub verdict_errors: u64,
    /// Errors reading the queue socket other than "nothing to read".
    pub recv_errors: u64,
    /// Most packets held at once.
    pub max_held: u64,
    /// Latest a packet left after its due time, in microseconds (the thread was not scheduled).
    pub max_late_us: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queued {} released {} overflowed {} verdict errors {} recv errors {} max held {} max late {:.1} ms",
            self.queued,
            self.released,
            self.overflowed,
            self.verdict_errors,
            self.recv_errors,
            self.max_held,
            self.max_late_us as f64 / 1000.0
        )
    }
}

/// [`Counts`] shared between the delayer thread and its owner.
#[derive(Debug, Default)]
struct SharedCounts {
    queued: AtomicU64,
    released: AtomicU64,
    overflowed: AtomicU64,
    verdict_errors: AtomicU64,
    recv_errors: AtomicU64,
    max_held: AtomicU64,
    max_late_us: AtomicU64,
}

impl SharedCounts {
    fn get(&self) -> Counts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            queued: l(&self.queued),
            released: l(&self.released),
            overflowed: l(&self.overflowed),
            verdict_errors: l(&self.verdict_errors),
            recv_errors: l(&self.recv_errors),
            max_held: l(&self.max_held),
            max_late_us: l(&self.max_late_us),
        }
    }
}

/// One namespace's delayer: a thread bound to its netfilter queues, stopped on drop (holding
/// nothing back: what it still holds is accepted at once).
pub struct Delayer {
    stop: Arc<AtomicBool>,
    counts: Arc<SharedCounts>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Delayer {
    /// Binds `queues` (number → hold time) in the namespace mounted at `netns` (as `ip netns`
    /// makes them) and starts holding their packets. Bind before adding the `NFQUEUE` rules
    /// (they use `--queue-bypass`, so packets pass undelayed while no one listens).
    #[cfg(not(target_os = "linux"))]
    pub fn start(_netns: &Path, _queues: Vec<(u16, Spec)>, _seed: u64) -> Result<Delayer, DelayerError> {
        Err(DelayerError::Unsupported)
    }

    /// Binds `queues` (number → hold time) in the namespace mounted at `netns` (as `ip netns`
    /// makes them) and starts holding their packets. Bind before adding the `NFQUEUE` rules
    /// (they use `--queue-bypass`, so packets pass undelayed while no one listens).
    #[cfg(target_os = "linux")]
    pub fn start(netns: &Path, queues: Vec<(u16, Spec)>, seed: u64) -> Result<Delayer, DelayerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(SharedCounts::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = netns.to_path_buf();
        let (st, c) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || {
            let mut q = match open(&ns, &queues) {
                Ok(q) => {
                    let _ = tx.send(Ok(()));
                    q
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let specs: BTreeMap<u16, Spec> = queues.into_iter().collect();
            run(&mut q, &specs, seed, &st, &c);
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(Delayer { stop, counts, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(DelayerError::Thread),
        }
    }
}

impl Delayer {
    /// What it did so far.
    pub fn counts(&self) -> Counts {
        self.counts.get()
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Enters the namespace (this thread only) and binds the queues there.
#[cfg(target_os = "linux")]
fn open(netns: &Path, queues: &[(u16, Spec)]) -> Result<nfq::Queue, DelayerError> {
    let name = netns.display().to_string();
    let f = std::fs::File::open(netns).map_err(|e| DelayerError::Netns(name.clone(), e))?;
    // setns on a thread moves only that thread; the netlink socket opened after it belongs to
    // the namespace for its whole life.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(DelayerError::Netns(name, std::io::Error::last_os_error()));
    }
    let first = queues.first().map(|q| q.0).unwrap_or(0);
    let mut q = nfq::Queue::open().map_err(|e| DelayerError::Queue(first, e))?;
    for (n, _) in queues {
        q.bind(*n).map_err(|e| DelayerError::Queue(*n, e))?;
        q.set_queue_max_len(*n, LIMIT as u32).map_err(|e| DelayerError::Queue(*n, e))?;
        // A full kernel queue lets packets through rather than dropping them.
        q.set_fail_open(*n, true).map_err(|e| DelayerError::Queue(*n, e))?;
    }
    q.set_nonblocking(true);
    Ok(q)
}

/// How long the loop sleeps at most between looks at the socket (the nfq crate exposes no file
/// descriptor to wait on); it bounds how late a packet may leave.
#[cfg(target_os = "linux")]
const POLL: Duration = Duration::from_micros(500);

#[cfg(target_os = "linux")]
fn run(q: &mut nfq::Queue, specs: &BTreeMap<u16, Spec>, seed: u64, stop: &AtomicBool, c: &SharedCounts) {
    let mut hold: Hold<nfq::Message> = Hold::new(LIMIT, seed);
    let bump = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
    let verdict = |q: &mut nfq::Queue, mut msg: nfq::Message, v: nfq::Verdict| {
        msg.set_verdict(v);
        if q.verdict(msg).is_err() {
            bump(&c.verdict_errors);
        }
    };
    while !stop.load(Ordering::SeqCst) {
        loop {
            match q.recv() {
                Ok(msg) => {
                    bump(&c.queued);
                    let spec = specs
                        .get(&msg.get_queue_num())
                        .copied()
                        .unwrap_or(Spec { delay: Duration::ZERO, jitter: Duration::ZERO });
                    let flow = flow_of(msg.get_payload());
                    if let Err(msg) = hold.push(Instant::now(), flow, spec, msg) {
                        bump(&c.overflowed);
                        verdict(q, msg, nfq::Verdict::Drop);
                    }
                    c.max_held.fetch_max(hold.len() as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bump(&c.recv_errors);
                    tracing::warn!("delayer: netfilter queue: {e}");
                    break;
                }
            }
        }
        let now = Instant::now();
        if let Some(due) = hold.next_due().filter(|t| *t <= now) {
            let late = u64::try_from(now.duration_since(due).as_micros()).unwrap_or(u64::MAX);
            c.max_late_us.fetch_max(late, Ordering::Relaxed);
        }
        for msg in hold.pop_due(now) {
            bump(&c.released);
            verdict(q, msg, nfq::Verdict::Accept);
        }
        let wait = hold.next_due().map_or(POLL, |t| t.saturating_duration_since(Instant::now()).min(POLL));
        std::thread::sleep(wait);
    }
    for msg in hold.drain() {
        bump(&c.released);
        verdict(q, msg, nfq::Verdict::Accept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn udp(src_port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&9u16.to_be_bytes());
        p
    }

    #[test]
    fn holds_for_the_delay_and_releases_in_time_order() {
        let t = Instant::now();
        let mut h = Hold::new(10, 1);
        let fixed = |d| Spec { delay: ms(d), jitter: Duration::ZERO };
        h.push(t, None, fixed(100), "slow").unwrap();
        h.push(t + ms(10), None, fixed(20), "fast").unwrap();
        assert!(h.pop_due(t + ms(29)).is_empty());
        assert_eq!(h.next_due(), Some(t + ms(30)));
        assert_eq!(h.pop_due(t + ms(30)), vec!["fast"]);
        assert!(h.pop_due(t + ms(99)).is_empty());
        assert_eq!(h.pop_due(t + ms(100)), vec!["slow"]);
        assert!(h.is_empty());
    }

    #[test]
    fn jitter_stays_in_range_keeps_flow_order_and_follows_the_seed() {
        let t = Instant::now();
        let spec = Spec { delay: ms(50), jitter: ms(40) };
        let run = |seed| {
            let mut h = Hold::new(1000, seed);
            let mut last = t;
            let mut times = Vec::new();
            for i in 0..200u64 {
                let now = t + Duration::from_micros(i * 100);
                let at = h.push(now, flow_of(&udp(1000)), spec, i).unwrap();
                assert!(at >= now + ms(50), "never less than the delay");
                assert!(at >= last, "one flow leaves in order");
                last = at;
                times.push(at);
            }
            let out = h.pop_due(t + ms(200));
            assert_eq!(out, (0..200).collect::<Vec<_>>());
            times
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Another flow is not held back by this one.
        let mut h = Hold::new(10, 3);
        h.push(t, flow_of(&udp(1)), Spec { delay: ms(100), jitter: Duration::ZERO }, "a").unwrap();
        let at = h.push(t, flow_of(&udp(2)), Spec { delay: ms(10), jitter: Duration::ZERO }, "b").unwrap();
        assert_eq!(at, t + ms(10));
        // Without jitter the spread is exact: every release within [delay, delay + jitter].
        let mut h = Hold::new(100, 5);
        for i in 0..50u16 {
            let at = h.push(t, flow_of(&udp(i)), spec, i).unwrap();
            assert!(at <= t + ms(90) && at >= t + ms(50));
        }
    }

    #[test]
    fn a_full_hold_refuses_and_short_packets_have_no_flow() {
        let t = Instant::now();
        let mut h = Hold::new(2, 1);
        let s = Spec { delay: ms(1), jitter: Duration::ZERO };
        h.push(t, None, s, 1).unwrap();
        h.push(t, None, s, 2).unwrap();
        assert_eq!(h.push(t, None, s, 3), Err(3));
        assert_eq!(h.len(), 2);
        assert_eq!(h.drain(), vec![1, 2]);
        assert_eq!(flow_of(&[0x45; 10]), None);
        assert_eq!(flow_of(&udp(7)), Some((17, [10, 0, 0, 1], [10, 0, 0, 2], 7, 9)));
    }
}
