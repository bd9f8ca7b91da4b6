//! World-size measurements: wall time per simulated minute and memory at N nodes.

use crate::scenario::Scenario;
use crate::world::{self, RunOptions};
use std::fmt;
use std::time::{Duration, Instant};

/// One measurement.
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// Nodes in the world.
    pub nodes: usize,
    /// Simulated time played.
    pub simulated: Duration,
    /// Wall time it took (world setup included).
    pub wall: Duration,
    /// CPU time (user + system) the process spent in that time: on a shared machine the
    /// steadier figure.
    pub cpu: Duration,
    /// Peak resident memory of the process so far, in MiB.
    pub peak_rss_mib: f64,
    /// Nodes that saw their whole org by the end.
    pub converged: usize,
    /// Pinged pairs whose last ping was answered (direct or relayed), of all pinged pairs.
    pub reached: (usize, usize),
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_min = self.wall.as_secs_f64() * 60.0 / self.simulated.as_secs_f64();
        let cpu_per_min = self.cpu.as_secs_f64() * 60.0 / self.simulated.as_secs_f64();
        write!(
            f,
            "{:>5} nodes: {:>7.2} s wall for {} s simulated = {:>7.2} s wall ({:.2} s CPU) per simulated minute; peak RSS {:.0} MiB; {}/{} nodes converged; {}/{} mesh pings answered",
            self.nodes,
            self.wall.as_secs_f64(),
            self.simulated.as_secs(),
            per_min,
            cpu_per_min,
            self.peak_rss_mib,
            self.converged,
            self.nodes,
            self.reached.0,
            self.reached.1
        )
    }
}

/// The benchmark world: orgs of 10 nodes; a third public, a third behind home NATs (EIM),
/// a third behind office NATs (symmetric), one NAT per 10 nodes; 20 ms links.
pub fn world_toml(nodes: usize, secs: u64, tick: Duration) -> String {
    let mut s = format!(
        "name = \"bench-{nodes}\"\nduration = \"{secs}s\"\n[net]\nlatency = \"20ms\"\njitter = \"5ms\"\ntick = \"{}ms\"\n",
        tick.as_millis()
    );
    let orgs = nodes.div_ceil(10);
    for o in 0..orgs {
        s += &format!("[[org]]\nname = \"org{o}\"\n");
    }
    for o in 0..orgs {
        let m = if o % 2 == 0 { "endpoint_independent" } else { "address_and_port_dependent" };
        s += &format!("[[nat]]\nname = \"nat{o}\"\nmapping = \"{m}\"\n");
    }
    for i in 0..nodes {
        s += &format!("[[node]]\nname = \"n{i}\"\norg = \"org{}\"\n", i / 10);
        if i % 3 != 0 {
            s += &format!("nat = \"nat{}\"\n", i / 10);
        }
    }
    // Every node pings the next one of its org through the mesh each second (data-plane load;
    // the path is only counted, not judged).
    for i in 0..nodes {
        let next = if (i + 1) % 10 == 0 || i + 1 == nodes { i - i % 10 } else { i + 1 };
        if next != i {
            s += &format!("[[expect]]\nkind = \"udp_path\"\na = \"n{i}\"\nb = \"n{next}\"\npath = \"direct\"\n");
        }
    }
    s
}

/// User + system CPU time of this process so far.
fn cpu_time() -> Duration {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            return tv(u.ru_utime) + tv(u.ru_stime);
        }
    }
    Duration::ZERO
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Plays the benchmark world with `nodes` nodes for `simulated` at `tick`.
pub fn measure(nodes: usize, simulated: Duration, tick: Duration) -> anyhow::Result<BenchResult> {
    let sc = Scenario::parse("bench", &world_toml(nodes, simulated.as_secs().max(1), tick))?;
    let (start, cpu0) = (Instant::now(), cpu_time());
    let out = world::run(&sc, &RunOptions { sample: Duration::from_secs(1), ..Default::default() })?;
    let (wall, cpu) = (start.elapsed(), cpu_time().saturating_sub(cpu0));
    let converged = out
        .visibility
        .iter()
        .filter(|(n, vis)| {
            let org = &sc.node(n).expect("node").org;
            let want = sc.nodes.iter().filter(|m| m.org.get_ref() == org.get_ref()).count() - 1;
            vis.len() == want
        })
        .count();
    let reached = (out.paths.values().filter(|p| **p != crate::probe::PathKind::None).count(), out.paths.len());
    Ok(BenchResult { nodes, simulated, wall, cpu, peak_rss_mib: peak_rss_mib(), converged, reached })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_world_converges() {
        let r = measure(10, Duration::from_secs(5), Duration::from_millis(10)).unwrap();
        assert_eq!(r.converged, 10, "{r}");
    }
}
