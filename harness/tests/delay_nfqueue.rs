//! The NFQUEUE delayer `--real` uses on kernels without `tc netem`, on real packets: in a
//! network namespace this test makes, UDP to one port is held for the delay and leaves in
//! order, UDP to another port is not held. Needs root, `ip` and iptables with `NFQUEUE`;
//! skipped otherwise (set `CITADEL_REQUIRE_REAL` to make that a failure).

use harness::delay::{Delayer, Spec};
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

/// Deletes the namespace when the test ends, however it ends.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0]).args(&args[1..]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn nfqueue_delayer_holds_udp_for_its_delay_in_order() {
    let root = unsafe { libc::geteuid() } == 0 && sh(&["ip", "-V"]);
    if !root {
        assert!(std::env::var_os("CITADEL_REQUIRE_REAL").is_none(), "needs root and iproute2");
        println!("skipping: not root or no iproute2");
        return;
    }
    let ns = Ns(format!("hzdly{}", std::process::id()));
    assert!(sh(&["ip", "netns", "add", &ns.0]));
    assert!(sh(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]));
    let netns = std::path::Path::new("/run/netns").join(&ns.0);
    let delay = Duration::from_millis(80);
    let d = Delayer::start(&netns, vec![(1, Spec { delay, jitter: Duration::from_millis(20) })], 7).expect("delayer");
    let rule = "iptables -t raw -A OUTPUT -o lo -p udp --dport 9999 -j NFQUEUE --queue-num 1 --queue-bypass";
    let mut args = vec!["ip", "netns", "exec", &ns.0];
    args.extend(rule.split(' '));
    if !sh(&args) {
        assert!(std::env::var_os("CITADEL_REQUIRE_REAL").is_none(), "iptables NFQUEUE unavailable");
        println!("skipping: iptables has no NFQUEUE target here");
        return;
    }
    let path = netns.clone();
    let (held, direct, order) = std::thread::spawn(move || {
        // This thread alone moves into the namespace; its sockets live there.
        let f = std::fs::File::open(&path).expect("netns file");
        assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
        let rx = UdpSocket::bind("127.0.0.1:9999").expect("bind");
        let rx2 = UdpSocket::bind("127.0.0.1:9998").expect("bind");
        for s in [&rx, &rx2] {
            s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        }
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let t0 = Instant::now();
        for i in 0u8..20 {
            tx.send_to(&[i], "127.0.0.1:9999").expect("send");
        }
        tx.send_to(&[99], "127.0.0.1:9998").expect("send");
        let mut buf = [0u8; 8];
        rx2.recv(&mut buf).expect("the unqueued port answers");
        let direct = t0.elapsed();
        let mut order = Vec::new();
        let mut first = None;
        for _ in 0..20 {
            rx.recv(&mut buf).expect("every held datagram leaves");
            first.get_or_insert(t0.elapsed());
            order.push(buf[0]);
        }
        (first.expect("received"), direct, order)
    })
    .join()
    .expect("namespace thread");
    drop(d);
    assert!(held >= delay, "held only {held:?}");
    assert!(held < Duration::from_secs(2), "held {held:?}");
    assert!(direct < delay, "a port without a rule is not held ({direct:?})");
    assert_eq!(order, (0u8..20).collect::<Vec<_>>(), "one flow keeps its order despite the jitter");
}
