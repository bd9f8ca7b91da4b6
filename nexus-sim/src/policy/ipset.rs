//! Sets of IP addresses as sorted, merged ranges, per family.
//!
//! Hand-written because the compiled filter must list a set as the minimal CIDR cover in
//! address order, IPv4 first (what Headscale's `netipx.IPSet.Prefixes` prints), and the
//! compiler needs fast membership tests; the `ipnet`/`ipnetwork` crates offer single
//! prefixes, not sets with removal and that cover.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IP prefix (address masked to its length on construction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// Network address (host bits clear).
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

impl Prefix {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, `x::y` or `x::y/n`; host bits are masked off.
    pub fn parse(s: &str) -> Option<Prefix> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => {
                let leading_zero = l.len() > 1 && l.starts_with('0');
                if l.is_empty() || l.len() > 3 || leading_zero || !l.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                (a, Some(l.parse::<u8>().ok()?))
            }
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(bits);
        (len <= bits).then(|| Prefix { addr: mask(addr, len), len })
    }

    /// True for a /32 or /128.
    pub fn is_single(&self) -> bool {
        self.len == bits(&self.addr)
    }

    /// Family index and the first and last address as numbers.
    fn range(&self) -> (usize, u128, u128) {
        let b = bits(&self.addr);
        let lo = to_u128(self.addr);
        let host = if self.len == b { 0 } else { max_of(b) >> self.len };
        (fam(&self.addr), lo, lo | host)
    }

    /// True when `self` and `other` share an address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let ((f, lo, hi), (g, lo2, hi2)) = (self.range(), other.range());
        f == g && lo <= hi2 && lo2 <= hi
    }

    /// True when every address of `other` is in `self`.
    pub fn contains_prefix(&self, other: &Prefix) -> bool {
        let ((f, lo, hi), (g, lo2, hi2)) = (self.range(), other.range());
        f == g && lo <= lo2 && hi2 <= hi
    }

    /// The smallest prefix holding all of `ps`; `None` when `ps` is empty or mixes families.
    pub fn cover(ps: &[Prefix]) -> Option<Prefix> {
        let (f, mut lo, mut hi) = ps.first()?.range();
        for (g, l, h) in ps.iter().map(Prefix::range) {
            if g != f {
                return None;
            }
            (lo, hi) = (lo.min(l), hi.max(h));
        }
        let b = if f == 0 { 32 } else { 128 };
        let len = ((lo ^ hi).leading_zeros() - (128 - b)) as u8;
        Some(Prefix { addr: mask(from_u128(f, lo), len), len })
    }
}

/// The tailnet's own address ranges: Tailscale's CGNAT range (100.64.0.0/10) and its ULA
/// range (fd7a:115c:a1e0::/48).
pub const TAILNET_RANGES: [Prefix; 2] = [
    Prefix { addr: IpAddr::V4(std::net::Ipv4Addr::new(100, 64, 0, 0)), len: 10 },
    Prefix { addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0)), len: 48 },
];

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn bits(a: &IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

fn fam(a: &IpAddr) -> usize {
    usize::from(!a.is_ipv4())
}

fn max_of(bits: u8) -> u128 {
    if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(family: usize, v: u128) -> IpAddr {
    if family == 0 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

fn mask(a: IpAddr, len: u8) -> IpAddr {
    let b = bits(&a);
    let host = if len >= b { 0 } else { max_of(b) >> len };
    from_u128(fam(&a), to_u128(a) & !host)
}

/// A set of addresses: merged inclusive ranges per family (index 0 IPv4, 1 IPv6).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    ranges: [Vec<(u128, u128)>; 2],
}

impl IpSet {
    /// Every IPv4 and IPv6 address.
    pub fn all() -> IpSet {
        IpSet { ranges: [vec![(0, max_of(32))], vec![(0, u128::MAX)]] }
    }

    /// True when the set holds no address.
    pub fn is_empty(&self) -> bool {
        self.ranges.iter().all(Vec::is_empty)
    }

    /// Adds one address.
    pub fn add_ip(&mut self, ip: IpAddr) {
        let v = to_u128(ip);
        self.add_range(fam(&ip), v, v);
    }

    /// Adds a prefix.
    pub fn add_prefix(&mut self, p: Prefix) {
        let (f, lo, hi) = p.range();
        self.add_range(f, lo, hi);
    }

    /// Adds every address of `other`.
    pub fn add_set(&mut self, other: &IpSet) {
        for f in 0..2 {
            for &(lo, hi) in &other.ranges[f] {
                self.add_range(f, lo, hi);
            }
        }
    }

    fn add_range(&mut self, f: usize, lo: u128, hi: u128) {
        let r = &mut self.ranges[f];
        let i = r.partition_point(|&(_, h)| lo > 0 && h < lo - 1);
        let mut j = i;
        let (mut nlo, mut nhi) = (lo, hi);
        while j < r.len() && r[j].0 <= hi.saturating_add(1) {
            nlo = nlo.min(r[j].0);
            nhi = nhi.max(r[j].1);
            j += 1;
        }
        r.splice(i..j, [(nlo, nhi)]);
    }

    /// Removes one address.
    pub fn remove_ip(&mut self, ip: IpAddr) {
        self.remove_prefix(Prefix { addr: ip, len: bits(&ip) });
    }

    /// Removes a prefix.
    pub fn remove_prefix(&mut self, p: Prefix) {
        let (f, lo, hi) = p.range();
        let mut out = Vec::with_capacity(self.ranges[f].len() + 1);
        for &(a, b) in &self.ranges[f] {
            if b < lo || a > hi {
                out.push((a, b));
                continue;
            }
            if a < lo {
                out.push((a, lo - 1));
            }
            if b > hi {
                out.push((hi + 1, b));
            }
        }
        self.ranges[f] = out;
    }

    /// True when `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let r = &self.ranges[fam(&ip)];
        let v = to_u128(ip);
        let i = r.partition_point(|&(_, h)| h < v);
        i < r.len() && r[i].0 <= v
    }

    /// True when some address of `p` is in the set (`netipx.IPSet.OverlapsPrefix`).
    pub fn overlaps_prefix(&self, p: &Prefix) -> bool {
        let (f, lo, hi) = p.range();
        let r = &self.ranges[f];
        let i = r.partition_point(|&(_, h)| h < lo);
        i < r.len() && r[i].0 <= hi
    }

    /// True when every address of `p` is in the set.
    pub fn contains_prefix(&self, p: &Prefix) -> bool {
        let (f, lo, hi) = p.range();
        let r = &self.ranges[f];
        let i = r.partition_point(|&(_, h)| h < lo);
        i < r.len() && r[i].0 <= lo && r[i].1 >= hi
    }

    /// Headscale's `DestsIsTheInternet`: the set is `autogroup:internet` or holds all of one
    /// family.
    pub fn is_the_internet(&self) -> bool {
        let all = |s: &str| Prefix::parse(s).expect("constant prefix");
        *self == the_internet() || self.contains_prefix(&all("0.0.0.0/0")) || self.contains_prefix(&all("::/0"))
    }

    /// The minimal list of prefixes covering exactly the set, IPv4 first, in address order.
    pub fn prefixes(&self) -> Vec<Prefix> {
        let mut out = vec![];
        for (f, width) in [(0usize, 32u8), (1, 128)] {
            for &(lo, hi) in &self.ranges[f] {
                cover(f, width, lo, hi, &mut out);
            }
        }
        out
    }

    /// [`IpSet::prefixes`] as strings.
    pub fn prefix_strings(&self) -> Vec<String> {
        self.prefixes().iter().map(Prefix::to_string).collect()
    }

    /// The set as filter sources in the fewest entries: each merged range that is exactly one
    /// prefix as that prefix, any other as an inclusive `first-last` range, IPv4 first, in
    /// address order. Tailscale's and citadel's filters read ranges in `SrcIPs`; an org of
    /// consecutively numbered members is one range per family where its prefix cover runs to
    /// ~20 prefixes each, and every member decodes that list again on every join.
    pub fn range_strings(&self) -> Vec<String> {
        let (mut out, mut one) = (vec![], vec![]);
        for (f, width) in [(0usize, 32u8), (1, 128)] {
            for &(lo, hi) in &self.ranges[f] {
                one.clear();
                cover(f, width, lo, hi, &mut one);
                match one[..] {
                    [p] => out.push(p.to_string()),
                    _ => out.push(format!("{}-{}", from_u128(f, lo), from_u128(f, hi))),
                }
            }
        }
        out
    }
}

fn cover(f: usize, width: u8, mut lo: u128, hi: u128, out: &mut Vec<Prefix>) {
    loop {
        let span = hi - lo;
        // Largest k with 2^k - 1 <= span.
        let by_span = if span == u128::MAX { 128 } else { 127 - (span + 1).leading_zeros() };
        let by_align = if lo == 0 { u32::from(width) } else { lo.trailing_zeros().min(u32::from(width)) };
        let k = by_span.min(by_align).min(u32::from(width));
        out.push(Prefix { addr: from_u128(f, lo), len: width - k as u8 });
        let size_minus_1 = if k == 128 { u128::MAX } else { (1u128 << k) - 1 };
        let last = lo + size_minus_1;
        if last >= hi {
            return;
        }
        lo = last + 1;
    }
}

/// Headscale's `util.ParseIPSet` without the bits argument: `*`, a masked prefix, a range
/// `a-b` or one address. `None` when the text is none of them.
pub fn parse_ip_set(s: &str) -> Option<IpSet> {
    let mut set = IpSet::default();
    if s == "*" {
        return Some(IpSet::all());
    }
    if s.contains('/') {
        let p = Prefix::parse(s)?;
        let raw: IpAddr = s.split('/').next()?.parse().ok()?;
        if raw != p.addr {
            return None; // non-network bits set
        }
        set.add_prefix(p);
        return Some(set);
    }
    if s.matches('-').count() == 1 {
        let (a, b) = s.split_once('-')?;
        let (a, b): (IpAddr, IpAddr) = (a.parse().ok()?, b.parse().ok()?);
        if a.is_ipv4() != b.is_ipv4() || to_u128(a) > to_u128(b) {
            return None;
        }
        set.add_range(fam(&a), to_u128(a), to_u128(b));
        return Some(set);
    }
    set.add_ip(s.parse().ok()?);
    Some(set)
}

/// True for an address in Tailscale's CGNAT range (minus the ChromeOS VM range) or its ULA
/// range, as `tsaddr.IsTailscaleIP`.
pub fn is_tailscale_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            o[0] == 100 && (64..128).contains(&o[1]) && !(o[1] == 115 && (o[2] & 0xfe) == 92)
        }
        IpAddr::V6(v) => v.segments()[..3] == [0xfd7a, 0x115c, 0xa1e0],
    }
}

/// `autogroup:internet`: all public addresses (Headscale's `util.TheInternet`).
pub fn the_internet() -> IpSet {
    let p = |s: &str| Prefix::parse(s).expect("constant prefix");
    let mut s = IpSet::default();
    s.add_prefix(p("2000::/3"));
    s.add_prefix(p("0.0.0.0/0"));
    for r in ["fc00::/7", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd7a:115c:a1e0::/48", "100.64.0.0/10"] {
        s.remove_prefix(p(r));
    }
    s.remove_prefix(p("169.254.0.0/16"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn adjacent_addresses_merge_into_the_minimal_cover() {
        let mut s = IpSet::default();
        for a in ["100.64.0.2", "100.64.0.3", "100.64.0.1", "fd7a:115c:a1e0::1"] {
            s.add_ip(ip(a));
        }
        assert_eq!(s.prefix_strings(), ["100.64.0.1/32", "100.64.0.2/31", "fd7a:115c:a1e0::1/128"]);
        assert_eq!(IpSet::all().prefix_strings(), ["0.0.0.0/0", "::/0"]);
    }

    /// Ranges print as one prefix where they are one, else as `first-last`, and read back as
    /// the same set.
    #[test]
    fn range_strings_are_the_fewest_entries_and_read_back() {
        let mut s = IpSet::default();
        for a in ["100.64.0.2", "100.64.0.3", "100.64.0.1", "100.64.0.9", "fd7a:115c:a1e0::1"] {
            s.add_ip(ip(a));
        }
        s.add_prefix(Prefix::parse("10.0.0.0/8").unwrap());
        let strings = s.range_strings();
        assert_eq!(strings, ["10.0.0.0/8", "100.64.0.1-100.64.0.3", "100.64.0.9/32", "fd7a:115c:a1e0::1/128"]);
        let mut back = IpSet::default();
        for t in &strings {
            back.add_set(&parse_ip_set(t).unwrap());
        }
        assert_eq!(back, s);
        let mut org = IpSet::default();
        for i in 1..=10_000u32 {
            org.add_ip(IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i)));
        }
        assert_eq!(org.range_strings(), ["100.64.0.1-100.64.39.16"]);
        // Where the prefix cover of the same 10,000 addresses takes 18 entries.
        assert_eq!(org.prefix_strings().len(), 18);
    }

    #[test]
    fn prefixes_are_masked_and_parse_rejects_junk() {
        assert_eq!(Prefix::parse("100.100.101.100/24").unwrap().to_string(), "100.100.101.0/24");
        assert_eq!(Prefix::parse("fd7a::1").unwrap().to_string(), "fd7a::1/128");
        for bad in ["", "1.2.3.4/33", "1.2.3/8", "x", "1.2.3.4/", "::/129", "1.2.3.4/-1", "1.2.3.4/08"] {
            assert!(Prefix::parse(bad).is_none(), "{bad}");
        }
        assert!(parse_ip_set("10.0.0.1/8").is_none(), "host bits set");
        assert!(parse_ip_set("10.0.0.1-10.0.0.9").unwrap().contains(ip("10.0.0.5")));
        assert!(parse_ip_set("*").unwrap().contains(ip("::1")));
    }

    #[test]
    fn cover_is_the_smallest_prefix_holding_all_of_one_family() {
        let p = |s: &str| Prefix::parse(s).unwrap();
        assert_eq!(Prefix::cover(&[p("100.64.0.1"), p("100.64.0.6/31")]), Some(p("100.64.0.0/29")));
        assert_eq!(Prefix::cover(&[p("10.0.0.1")]), Some(p("10.0.0.1/32")));
        assert_eq!(Prefix::cover(&[p("10.0.0.1"), p("fd7a::1")]), None, "mixed families");
        assert_eq!(Prefix::cover(&[]), None);
        assert!(p("100.64.0.0/10").contains_prefix(&p("100.64.0.0/29")));
        assert!(!p("100.64.0.0/29").contains_prefix(&p("100.64.0.0/10")));
        assert!(p("100.64.0.0/29").overlaps(&p("100.64.0.0/10")) && !p("100.64.0.0/10").overlaps(&p("10.0.0.0/8")));
        assert_eq!(TAILNET_RANGES, [p("100.64.0.0/10"), p("fd7a:115c:a1e0::/48")]);
    }

    #[test]
    fn the_internet_excludes_private_and_tailnet_ranges() {
        let i = the_internet();
        assert!(i.contains(ip("8.8.8.8")) && i.contains(ip("2001:db8::1")));
        for a in ["10.1.2.3", "100.64.0.1", "192.168.1.1", "169.254.1.1", "fd7a:115c:a1e0::1", "fe80::1"] {
            assert!(!i.contains(ip(a)), "{a}");
        }
        assert!(is_tailscale_ip(ip("100.64.0.0")) && !is_tailscale_ip(ip("100.115.92.1")));
    }

    proptest! {
        /// The cover lists exactly the added addresses, with no two prefixes mergeable or
        /// overlapping, whatever the order of insertion.
        #[test]
        fn cover_is_exact(addrs in proptest::collection::vec(0u32..4096, 0..60), removed in 0u32..4096) {
            let mut s = IpSet::default();
            for a in &addrs {
                s.add_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + a)));
            }
            s.remove_prefix(Prefix::parse(&format!("{}/32", Ipv4Addr::from(0x0a00_0000 + removed))).unwrap());
            let ps = s.prefixes();
            for a in 0..4096u32 {
                let x = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + a));
                let want = addrs.contains(&a) && a != removed;
                prop_assert_eq!(s.contains(x), want);
                let covered = ps.iter().filter(|p| {
                    let (_, lo, hi) = p.range();
                    (lo..=hi).contains(&to_u128(x))
                }).count();
                prop_assert_eq!(covered, usize::from(want));
            }
            for w in ps.windows(2) {
                let (_, _, h0) = w[0].range();
                let (_, l1, _) = w[1].range();
                prop_assert!(h0 < l1);
            }
        }
    }
}
