//! Headscale's ACL policy (the v2 format of Headscale 0.26/0.27): parsing HuJSON, validating
//! with Headscale's rules and messages (plus line numbers), and compiling to each node's
//! packet filter and peer list the way Headscale's `hscontrol/policy/v2` does.
//!
//! Facts followed (Headscale v0.27.1 unless noted):
//! - no policy, or a policy without an `acls` key, allows everything (`FilterAllowAll`);
//!   `"acls": []` allows nothing;
//! - a rule's sources resolve to a set of addresses printed as its minimal prefix cover; each
//!   destination alias is printed prefix by prefix, times its port ranges, in rule order;
//! - an empty `proto` means TCP and UDP (`[6, 17]`), `icmp` means `[1, 58]`;
//! - users (`name@`) and groups resolve to their untagged nodes; tags to nodes carrying the
//!   tag; a host or single address that is a node's address adds all of that node's addresses;
//! - a node's filter keeps the destinations that contain one of its addresses;
//! - with `autogroup:self` anywhere, rules compile per node, the sources of a self
//!   destination narrowed to the node owner's untagged nodes, destinations as bare addresses;
//! - a node's map lists a peer when either may open a connection to the other (per-node
//!   rules of both are consulted with `autogroup:self`, as Headscale's main branch does;
//!   0.27.1 consulted only one direction there, which hid clients from a tagged server).

mod hujson;
pub mod ipset;
pub mod state;

pub use state::PolicyState;

use citadel_proto::tailcfg::{FilterRule, NetPortRange, PortRange};
use ipset::{IpSet, Prefix};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Largest policy accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// The built-in policy with no `--policy`: every org (user) reaches only its own nodes.
pub const ORG_ISOLATION: &str = r#"// nexus-sim's built-in policy: each org (user) sees and reaches only its own devices.
{
  "acls": [
    // TCP and UDP, every port, between devices of the same org.
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    // ICMP too (an empty proto means TCP and UDP only).
    {"action": "accept", "proto": "icmp", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
}
"#;

/// Headscale's behaviour without a policy (`--headscale-default`): everyone reaches everyone.
pub const HEADSCALE_DEFAULT: &str = r#"// Headscale's default with no policy: every node may reach every other (FilterAllowAll).
{}
"#;

/// One problem found in a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// 1-based line in the policy text, when one can be named.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Why a policy was refused: every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .issues.iter().map(Issue::to_string).collect::<Vec<_>>().join("\n"))]
pub struct PolicyError {
    /// Every problem found, in text order.
    pub issues: Vec<Issue>,
}

impl PolicyError {
    fn one(line: Option<usize>, message: impl Into<String>) -> PolicyError {
        PolicyError { issues: vec![Issue { line, message: message.into() }] }
    }
}

/// An alias in `src`/`dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Alias {
    Wildcard,
    User(String),
    Group(String),
    Tag(String),
    Host(String),
    Prefix(Prefix),
    Auto(AutoGroup),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AutoGroup {
    Internet,
    Member,
    NonRoot,
    Tagged,
    SelfDevices,
}

const AUTOGROUPS: [(&str, AutoGroup); 5] = [
    ("autogroup:internet", AutoGroup::Internet),
    ("autogroup:member", AutoGroup::Member),
    ("autogroup:nonroot", AutoGroup::NonRoot),
    ("autogroup:tagged", AutoGroup::Tagged),
    ("autogroup:self", AutoGroup::SelfDevices),
];

#[derive(Debug, Clone)]
struct Acl {
    src: Vec<Alias>,
    /// The `src` and `dst` strings as written, for locating errors.
    raw: (Vec<String>, Vec<String>),
    dst: Vec<(Alias, Vec<PortRange>)>,
    proto: Vec<i32>,
}

/// A parsed, validated policy and the text it came from.
#[derive(Debug, Clone)]
pub struct Policy {
    text: String,
    groups: BTreeMap<String, Vec<String>>,
    hosts: BTreeMap<String, Prefix>,
    acls: Option<Vec<Acl>>,
    auto: AutoApprovers,
}

/// `autoApprovers`: who may have which advertised routes approved without an admin.
#[derive(Debug, Clone, Default)]
struct AutoApprovers {
    /// A prefix and its approvers (users, groups, tags), with the approvers as written.
    routes: Vec<(Prefix, Vec<(Alias, String)>)>,
    /// Approvers of exit routes.
    exit: Vec<(Alias, String)>,
}

/// A user (org) as the compiler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyUser {
    /// User id.
    pub id: u64,
    /// User name.
    pub name: String,
    /// E-mail address (may be empty).
    pub email: String,
}

/// A node as the compiler needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyNode {
    /// Node id.
    pub id: u64,
    /// Owner's user id.
    pub user_id: u64,
    /// Its addresses, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// Its ACL tags.
    pub tags: Vec<String>,
    /// Subnet routes it serves: advertised, approved, not exit routes (`SubnetRoutes`).
    pub routes: Vec<Prefix>,
    /// Every route it advertises (`Hostinfo.RoutableIPs`), approved or not.
    pub announced: Vec<Prefix>,
    /// True when it serves an approved exit route (`IsExitNode`).
    pub exit: bool,
}

impl PolicyNode {
    /// A node with one IPv4 and one IPv6 address.
    pub fn new(id: u64, user_id: u64, ipv4: Ipv4Addr, ipv6: Ipv6Addr, tags: Vec<String>) -> PolicyNode {
        PolicyNode { id, user_id, ips: vec![IpAddr::V4(ipv4), IpAddr::V6(ipv6)], tags, ..Default::default() }
    }
    fn ips(&self) -> Vec<IpAddr> {
        self.ips.clone()
    }
    fn tagged(&self) -> bool {
        !self.tags.is_empty()
    }
    fn in_set(&self, s: &IpSet) -> bool {
        self.ips.iter().any(|ip| s.contains(*ip))
    }
    /// True when `s` overlaps a route it advertises or serves (a router keeps those
    /// destinations in its filter).
    fn routes_overlap(&self, s: &IpSet) -> bool {
        self.announced.iter().chain(&self.routes).any(|r| s.overlaps_prefix(r))
    }
    fn add_to(&self, s: &mut IpSet) {
        for ip in &self.ips {
            s.add_ip(*ip);
        }
    }
}

/// `FilterAllowAll`: any source, any destination, any port, default protocols.
pub fn filter_allow_all() -> Vec<FilterRule> {
    vec![FilterRule {
        src_ips: vec!["*".into()],
        dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
        ip_proto: vec![],
    }]
}

// ---------------------------------------------------------------- parsing

struct Ctx<'a> {
    /// The text with comments blanked (same offsets), for locating tokens.
    std: &'a str,
    issues: Vec<Issue>,
}

impl Ctx<'_> {
    /// Line of the first occurrence of `token` as a JSON string.
    fn line_of(&self, token: &str) -> Option<usize> {
        let quoted = serde_json::to_string(token).ok()?;
        self.std.find(&quoted).map(|at| hujson::line_at(self.std, at))
    }
    fn err(&mut self, token: &str, message: impl Into<String>) {
        let line = self.line_of(token);
        self.issues.push(Issue { line, message: message.into() });
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn strings(ctx: &mut Ctx, key: &str, v: &Value) -> Option<Vec<String>> {
    let Some(arr) = v.as_array() else {
        ctx.err(key, format!("{key:?} must be an array of strings, got {}", type_name(v)));
        return None;
    };
    let mut out = vec![];
    for item in arr {
        match item.as_str() {
            Some(s) => out.push(s.to_string()),
            None => {
                ctx.err(key, format!("{key:?} must hold strings, got {}", type_name(item)));
                return None;
            }
        }
    }
    Some(out)
}

fn parse_alias(s: &str) -> Result<Alias, String> {
    if let Some(p) = Prefix::parse(s) {
        return Ok(Alias::Prefix(p));
    }
    if s == "*" {
        return Ok(Alias::Wildcard);
    }
    if s.contains('@') {
        return Ok(Alias::User(s.to_string()));
    }
    if s.starts_with("group:") {
        return Ok(Alias::Group(s.to_string()));
    }
    if s.starts_with("tag:") {
        return Ok(Alias::Tag(s.to_string()));
    }
    if s.starts_with("autogroup:") {
        return AUTOGROUPS.iter().find(|(n, _)| *n == s).map(|(_, a)| Alias::Auto(*a)).ok_or_else(|| {
            let names: Vec<&str> = AUTOGROUPS.iter().map(|(n, _)| *n).collect();
            format!("AutoGroup is invalid, got: {s:?}, must be one of [{}]", names.join(" "))
        });
    }
    if !s.contains(':') {
        return Ok(Alias::Host(s.to_string()));
    }
    Err(format!(
        "Invalid alias {s:?}. An alias must be one of the following types: wildcard (*), user (containing an \"@\"), \
         group (starting with \"group:\"), tag (starting with \"tag:\"), autogroup (starting with \"autogroup:\"), \
         host, or an IP address or prefix"
    ))
}

fn parse_port(s: &str) -> Result<u16, String> {
    let n: i64 = s.parse().map_err(|_| "invalid port number".to_string())?;
    u16::try_from(n).map_err(|_| "port number out of range".to_string())
}

fn parse_ports(def: &str) -> Result<Vec<PortRange>, String> {
    if def == "*" {
        return Ok(vec![PortRange { first: 0, last: 65535 }]);
    }
    let mut out = vec![];
    for part in def.split(',') {
        if part.contains('-') {
            let r: Vec<&str> = part.split('-').filter(|e| !e.is_empty()).collect();
            if r.len() != 2 {
                return Err("invalid port range format".into());
            }
            let (first, last) = (parse_port(r[0])?, parse_port(r[1])?);
            if first > last {
                return Err("invalid port range: first port is greater than last port".into());
            }
            out.push(PortRange { first, last });
        } else {
            let p = parse_port(part)?;
            if p < 1 {
                return Err("first port must be >0, or use '*' for wildcard".into());
            }
            out.push(PortRange { first: p, last: p });
        }
    }
    Ok(out)
}

fn parse_dst(s: &str) -> Result<(Alias, Vec<PortRange>), String> {
    let Some(at) = s.rfind(':') else { return Err(r#"hostport must contain a colon (":")"#.into()) };
    if at == 0 {
        return Err("input cannot start with a colon character".into());
    }
    if at == s.len() - 1 {
        return Err("input cannot end with a colon character".into());
    }
    let ports = parse_ports(&s[at + 1..])?;
    Ok((parse_alias(&s[..at])?, ports))
}

/// IANA numbers of `proto` (already lower-cased), or Headscale's refusal.
fn parse_proto(p: &str) -> Result<Vec<i32>, String> {
    Ok(match p {
        "" => vec![6, 17],
        "icmp" => vec![1, 58],
        "igmp" => vec![2],
        "ipv4" | "ip-in-ip" => vec![4],
        "tcp" => vec![6],
        "egp" => vec![8],
        "igp" => vec![9],
        "udp" => vec![17],
        "gre" => vec![47],
        "esp" => vec![50],
        "ah" => vec![51],
        "sctp" => vec![132],
        "*" => {
            return Err(
                r#"proto name "*" not known; use protocol number 0-255 or protocol name (icmp, tcp, udp, etc.)"#.into(),
            )
        }
        n => {
            if n == "0" || (n.len() > 1 && n.starts_with('0')) {
                return Err(format!("leading 0 not permitted in protocol number {n:?}"));
            }
            let num: i64 = n.parse().map_err(|_| {
                format!("invalid protocol {n:?}: must be a known protocol name or valid protocol number 0-255")
            })?;
            if !(0..=255).contains(&num) {
                return Err(format!("protocol number {num} out of range (0-255)"));
            }
            vec![num as i32]
        }
    })
}

impl Policy {
    /// Parses and validates a HuJSON policy. Every problem found is reported, with its line.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::one(None, format!("policy is larger than {MAX_POLICY_BYTES} bytes")));
        }
        if text.trim().is_empty() {
            return Err(PolicyError::one(None, "policy is empty"));
        }
        let std = hujson::standardize(text).map_err(|e| PolicyError::one(Some(e.line), "unterminated /* comment"))?;
        let root: Value = serde_json::from_str(&std).map_err(|e| {
            let msg = e.to_string();
            let what = msg.split(" at line ").next().unwrap_or(&msg);
            PolicyError::one(Some(e.line()), format!("parsing HuJSON: {what} (column {})", e.column()))
        })?;
        let Value::Object(root) = root else {
            return Err(PolicyError::one(Some(1), "a policy must be a JSON object"));
        };
        let mut ctx = Ctx { std: &std, issues: vec![] };
        let mut groups = BTreeMap::new();
        let mut hosts = BTreeMap::new();
        let mut tag_owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut acls = None;
        let mut auto = AutoApprovers::default();
        for (key, v) in &root {
            match key.to_ascii_lowercase().as_str() {
                "groups" => parse_groups(&mut ctx, v, &mut groups),
                "hosts" => parse_hosts(&mut ctx, v, &mut hosts),
                "tagowners" => parse_tag_owners(&mut ctx, v, &mut tag_owners),
                "acls" => acls = parse_acls(&mut ctx, v),
                "autoapprovers" => auto = parse_auto_approvers(&mut ctx, v),
                // SSH is not served by nexus-sim; its shape is still checked.
                "ssh" if v.is_array() => {}
                "ssh" => {
                    ctx.err(key, format!("{key:?} has the wrong type {}", type_name(v)));
                }
                _ => ctx.err(key, format!("unknown field {key:?}")),
            }
        }
        let pol = Policy { text: text.to_string(), groups, hosts, acls, auto };
        pol.validate(&mut ctx, &tag_owners);
        if ctx.issues.is_empty() {
            Ok(pol)
        } else {
            Err(PolicyError { issues: ctx.issues })
        }
    }

    /// The text the policy was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True when some rule names `autogroup:self` (rules then compile per node).
    pub fn uses_autogroup_self(&self) -> bool {
        self.acls.iter().flatten().any(|a| {
            a.src.contains(&Alias::Auto(AutoGroup::SelfDevices))
                || a.dst.iter().any(|(d, _)| *d == Alias::Auto(AutoGroup::SelfDevices))
        })
    }

    fn validate(&self, ctx: &mut Ctx, tag_owners: &BTreeMap<String, Vec<String>>) {
        let undefined = |kind: &str, name: &str| {
            format!("{kind} {name:?} is not defined in the Policy, please define or remove the reference to it")
        };
        let check = |ctx: &mut Ctx, a: &Alias, is_src: bool, raw: &str| match a {
            Alias::Host(h) if !self.hosts.contains_key(h) => ctx.err(raw, undefined("Host", h)),
            Alias::Group(g) if !self.groups.contains_key(g) => ctx.err(raw, undefined("Group", g)),
            Alias::Tag(t) if !tag_owners.contains_key(t) => ctx.err(raw, undefined("Tag", t)),
            Alias::Auto(ag) => {
                let name = AUTOGROUPS.iter().find(|(_, x)| x == ag).map(|(n, _)| *n).unwrap_or_default();
                let msg = match (is_src, ag) {
                    (true, AutoGroup::Internet | AutoGroup::SelfDevices) => {
                        Some(format!("{name:?} used in source, it can only be used in ACL destinations"))
                    }
                    (true, AutoGroup::NonRoot) => Some(format!(
                        "autogroup {name:?} is not supported for ACL sources, can be [autogroup:member autogroup:tagged]"
                    )),
                    (false, AutoGroup::NonRoot) => Some(format!(
                        "autogroup {name:?} is not supported for ACL destinations, can be [autogroup:internet \
                         autogroup:member autogroup:tagged autogroup:self]"
                    )),
                    _ => None,
                };
                if let Some(m) = msg {
                    ctx.err(raw, m);
                }
            }
            _ => {}
        };
        for acl in self.acls.iter().flatten() {
            for (s, raw) in acl.src.iter().zip(&acl.raw.0) {
                check(ctx, s, true, raw);
            }
            for ((d, _), raw) in acl.dst.iter().zip(&acl.raw.1) {
                check(ctx, d, false, raw);
            }
        }
        let approvers = self.auto.routes.iter().flat_map(|(_, a)| a).chain(&self.auto.exit);
        for (a, raw) in approvers {
            match a {
                Alias::Group(g) if !self.groups.contains_key(g) => ctx.err(raw, undefined("Group", g)),
                Alias::Tag(t) if !tag_owners.contains_key(t) => ctx.err(raw, undefined("Tag", t)),
                _ => {}
            }
        }
        for (tag, owners) in tag_owners {
            for o in owners {
                if o.starts_with("group:") && !self.groups.contains_key(o) {
                    ctx.err(o, format!("{} (tagOwners of {tag:?})", undefined("Group", o)));
                }
            }
        }
    }
}

fn parse_groups(ctx: &mut Ctx, v: &Value, out: &mut BTreeMap<String, Vec<String>>) {
    let Some(m) = v.as_object() else {
        ctx.err("groups", format!("\"groups\" must be an object, got {}", type_name(v)));
        return;
    };
    for (name, members) in m {
        if !name.starts_with("group:") {
            ctx.err(name, format!("Group has to start with \"group:\", got: {name:?}"));
            continue;
        }
        let Some(list) = members.as_array() else {
            let msg = match members.as_str() {
                Some(s) => format!("Group {name:?} value must be an array of users, got string: {s:?}"),
                None => format!("Group {name:?} value must be an array of users, got {}", type_name(members)),
            };
            ctx.err(name, msg);
            continue;
        };
        let mut users = vec![];
        for u in list {
            let Some(u) = u.as_str() else {
                ctx.err(
                    name,
                    format!("Group {name:?} contains invalid member type, expected string but got {}", type_name(u)),
                );
                continue;
            };
            if !u.contains('@') {
                let msg = if u.starts_with("group:") {
                    format!("Nested groups are not allowed, found {u:?} inside {name:?}")
                } else {
                    format!("Username has to contain @, got: {u:?}")
                };
                ctx.err(u, msg);
                continue;
            }
            users.push(u.to_string());
        }
        out.insert(name.clone(), users);
    }
}

fn parse_hosts(ctx: &mut Ctx, v: &Value, out: &mut BTreeMap<String, Prefix>) {
    let Some(m) = v.as_object() else {
        ctx.err("hosts", format!("\"hosts\" must be an object, got {}", type_name(v)));
        return;
    };
    for (name, addr) in m {
        if name.contains('@') || name.contains(':') {
            ctx.err(name, format!("Hostname {name:?} is invalid"));
            continue;
        }
        match addr.as_str().and_then(Prefix::parse) {
            Some(p) => {
                out.insert(name.clone(), p);
            }
            None => ctx.err(
                name,
                format!("Hostname {name:?} contains an invalid IP address: {:?}", addr.as_str().unwrap_or_default()),
            ),
        }
    }
}

fn parse_tag_owners(ctx: &mut Ctx, v: &Value, out: &mut BTreeMap<String, Vec<String>>) {
    let Some(m) = v.as_object() else {
        ctx.err("tagOwners", format!("\"tagOwners\" must be an object, got {}", type_name(v)));
        return;
    };
    for (tag, owners) in m {
        if !tag.starts_with("tag:") {
            ctx.err(tag, format!("tag has to start with \"tag:\", got: {tag:?}"));
            continue;
        }
        let Some(list) = strings(ctx, tag, owners) else { continue };
        for o in &list {
            if !(o.contains('@') || o.starts_with("group:")) {
                ctx.err(
                    o,
                    format!("Invalid Owner {o:?}. An owner must be a user (containing an \"@\") or a group (starting with \"group:\")"),
                );
            }
        }
        out.insert(tag.clone(), list);
    }
}

/// One auto-approver: a user, a group or a tag.
fn parse_approver(ctx: &mut Ctx, s: &str) -> Option<(Alias, String)> {
    let a = if s.contains('@') {
        Alias::User(s.to_string())
    } else if s.starts_with("group:") {
        Alias::Group(s.to_string())
    } else if s.starts_with("tag:") {
        Alias::Tag(s.to_string())
    } else {
        ctx.err(
            s,
            format!(
                "Invalid AutoApprover {s:?}. An alias must be one of the following types: user (containing an \"@\"), \
                 group (starting with \"group:\"), tag (starting with \"tag:\")"
            ),
        );
        return None;
    };
    Some((a, s.to_string()))
}

fn parse_approvers(ctx: &mut Ctx, key: &str, v: &Value) -> Vec<(Alias, String)> {
    let Some(list) = strings(ctx, key, v) else { return vec![] };
    list.iter().filter_map(|s| parse_approver(ctx, s)).collect()
}

fn parse_auto_approvers(ctx: &mut Ctx, v: &Value) -> AutoApprovers {
    let mut out = AutoApprovers::default();
    let Some(m) = v.as_object() else {
        ctx.err("autoApprovers", format!("\"autoApprovers\" must be an object, got {}", type_name(v)));
        return out;
    };
    for (key, v) in m {
        match key.to_ascii_lowercase().as_str() {
            "routes" => {
                let Some(routes) = v.as_object() else {
                    ctx.err(key, format!("\"routes\" must be an object, got {}", type_name(v)));
                    continue;
                };
                for (prefix, approvers) in routes {
                    let Some(p) = Prefix::parse(prefix).filter(|_| prefix.contains('/')) else {
                        ctx.err(prefix, format!("autoApprovers: {prefix:?} is not an IP prefix"));
                        continue;
                    };
                    let list = parse_approvers(ctx, prefix, approvers);
                    out.routes.push((p, list));
                }
            }
            "exitnode" => out.exit = parse_approvers(ctx, key, v),
            _ => ctx.err(key, format!("unknown field {key:?} in autoApprovers")),
        }
    }
    out
}

fn parse_acls(ctx: &mut Ctx, v: &Value) -> Option<Vec<Acl>> {
    let Some(list) = v.as_array() else {
        ctx.err("acls", format!("\"acls\" must be an array, got {}", type_name(v)));
        return Some(vec![]);
    };
    let mut out = vec![];
    for item in list {
        let Some(obj) = item.as_object() else {
            ctx.err("acls", format!("an ACL must be an object, got {}", type_name(item)));
            continue;
        };
        let (mut action, mut proto, mut src, mut dst) = (None, String::new(), vec![], vec![]);
        let mut raw = (vec![], vec![]);
        let mut ok = true;
        for (k, val) in obj {
            if k.starts_with('#') {
                continue; // headscale-admin keeps metadata in '#' fields
            }
            match k.to_ascii_lowercase().as_str() {
                "action" => action = Some(val.as_str().unwrap_or_default().to_string()),
                "proto" => match val.as_str() {
                    Some(p) => proto = p.to_ascii_lowercase(),
                    None => {
                        ctx.err(k, format!("\"proto\" must be a string, got {}", type_name(val)));
                        ok = false;
                    }
                },
                "src" => match strings(ctx, k, val) {
                    Some(list) => {
                        for s in list {
                            match parse_alias(&s) {
                                Ok(a) => {
                                    src.push(a);
                                    raw.0.push(s);
                                }
                                Err(e) => {
                                    ctx.err(&s, e);
                                    ok = false;
                                }
                            }
                        }
                    }
                    None => ok = false,
                },
                "dst" => match strings(ctx, k, val) {
                    Some(list) => {
                        for s in list {
                            match parse_dst(&s) {
                                Ok(d) => {
                                    dst.push(d);
                                    raw.1.push(s);
                                }
                                Err(e) => {
                                    ctx.err(&s, format!("{e} (in {s:?})"));
                                    ok = false;
                                }
                            }
                        }
                    }
                    None => ok = false,
                },
                _ => {
                    ctx.err(k, format!("unknown field {k:?}"));
                    ok = false;
                }
            }
        }
        let action = action.unwrap_or_default();
        if action != "accept" {
            ctx.err(&action, format!("invalid action {action:?}, must be \"accept\""));
            ok = false;
        }
        let protos = match parse_proto(&proto) {
            Ok(p) => p,
            Err(e) => {
                ctx.err(&proto, e);
                ok = false;
                vec![]
            }
        };
        if !matches!(proto.as_str(), "tcp" | "udp" | "sctp" | "")
            && dst.iter().any(|(_, ports)| ports.iter().any(|p| !(p.first == 0 && p.last == 65535)))
        {
            ctx.err(&proto, format!("protocol {proto:?} does not support specific ports; only \"*\" is allowed"));
            ok = false;
        }
        if ok {
            out.push(Acl { src, raw, dst, proto: protos });
        }
    }
    Some(out)
}

// ---------------------------------------------------------------- compiling

/// One rule with its destinations already parsed (for reduction and matching).
#[derive(Debug, Clone)]
struct Rule {
    rule: FilterRule,
    dst_sets: Vec<Option<IpSet>>,
}

impl Rule {
    fn new(rule: FilterRule) -> Rule {
        let dst_sets = rule.dst_ports.iter().map(|d| ipset::parse_ip_set(&d.ip)).collect();
        Rule { rule, dst_sets }
    }
}

/// Sources and destinations of one rule, ports ignored (Headscale's `matcher.Match`).
#[derive(Debug, Clone)]
struct Matcher {
    srcs: IpSet,
    dsts: IpSet,
    /// The destinations are "the internet" (exit nodes are reached through it).
    internet: bool,
}

impl Matcher {
    /// True when `n` is a destination: one of its addresses, a subnet it serves, or the
    /// internet when it is an exit node (Headscale's `CanAccess`, destination side).
    fn dst_has(&self, n: &PolicyNode) -> bool {
        n.in_set(&self.dsts) || n.routes.iter().any(|r| self.dsts.overlaps_prefix(r)) || (n.exit && self.internet)
    }

    /// Headscale's `CanAccessRoute` for one matcher, as of its main branch (subnet routers
    /// also reach routes on behalf of their own subnets).
    fn allows_route(&self, n: &PolicyNode, route: &Prefix) -> bool {
        (n.in_set(&self.srcs) && self.dsts.overlaps_prefix(route))
            || (self.srcs.overlaps_prefix(route) && n.in_set(&self.dsts))
            || (n.routes.iter().any(|r| self.srcs.overlaps_prefix(r)) && self.dsts.overlaps_prefix(route))
            || (self.srcs.overlaps_prefix(route) && n.routes.iter().any(|r| self.dsts.overlaps_prefix(r)))
    }
}

fn matchers(rules: &[Rule]) -> Vec<Matcher> {
    rules
        .iter()
        .map(|r| {
            let mut srcs = IpSet::default();
            for s in &r.rule.src_ips {
                if let Some(set) = ipset::parse_ip_set(s) {
                    srcs.add_set(&set);
                }
            }
            let mut dsts = IpSet::default();
            for set in r.dst_sets.iter().flatten() {
                dsts.add_set(set);
            }
            let internet = dsts.is_the_internet();
            Matcher { srcs, dsts, internet }
        })
        .collect()
}

/// Headscale's `ReduceRoutes`: the routes `node` may reach under `rules` (unreduced rules,
/// in the order given).
pub fn reduce_routes(node: &PolicyNode, routes: &[Prefix], rules: &[FilterRule]) -> Vec<Prefix> {
    let rules: Vec<Rule> = rules.iter().cloned().map(Rule::new).collect();
    let ms = matchers(&rules);
    routes.iter().filter(|r| ms.iter().any(|m| m.allows_route(node, r))).copied().collect()
}

/// The policy compiled against a set of users and nodes: each node's filter and peers.
#[derive(Debug, Clone)]
pub struct Compiled {
    nodes: Vec<PolicyNode>,
    index: HashMap<u64, usize>,
    /// Rules per node before reduction (one shared list unless `autogroup:self` is used).
    rules: RulesBy,
    /// Peers of each node, by index, as a bitset: node `i`'s row is
    /// `peers[i * words..(i + 1) * words]`.
    peers: Vec<u64>,
    /// Words per row of `peers`.
    words: usize,
    /// The rules' matchers, parallel to `rules`.
    matchers: MatchersBy,
    /// Ids of the nodes that serve routes (subnet or exit), ascending.
    routers: Vec<u64>,
    /// This compile's number, and the number of the compile whose ids begin this one's (set
    /// by [`Compiled::after`]).
    serial: u64,
    extends: Option<u64>,
}

/// Numbers compiles for [`Compiled::after`].
static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Debug, Clone)]
enum MatchersBy {
    Global(Vec<Matcher>),
    PerNode(Vec<Vec<Matcher>>),
}

#[derive(Debug, Clone)]
enum RulesBy {
    Global(Vec<Rule>),
    PerNode(Vec<Vec<Rule>>),
}

struct Resolver<'a> {
    pol: &'a Policy,
    users: &'a [PolicyUser],
    nodes: &'a [PolicyNode],
}

impl Resolver<'_> {
    fn user_id(&self, token: &str) -> Option<u64> {
        let t = token.strip_suffix('@').unwrap_or(token);
        let mut found = self.users.iter().filter(|u| u.name == t || (!u.email.is_empty() && u.email == t));
        match (found.next(), found.next()) {
            (Some(u), None) => Some(u.id),
            _ => None,
        }
    }

    fn user_set(&self, token: &str) -> (IpSet, bool) {
        let mut s = IpSet::default();
        let Some(id) = self.user_id(token) else { return (s, false) };
        for n in self.nodes.iter().filter(|n| !n.tagged() && n.user_id == id) {
            n.add_to(&mut s);
        }
        (s, true)
    }

    /// Adds every address of the nodes holding `p`'s address when `p` is one address or a
    /// Tailscale address (Headscale's `appendIfNodeHasIP`).
    fn add_node_of(&self, s: &mut IpSet, p: &Prefix) {
        if !p.is_single() && !ipset::is_tailscale_ip(p.addr) {
            return;
        }
        for n in self.nodes.iter().filter(|n| n.ips.contains(&p.addr)) {
            n.add_to(s);
        }
    }

    /// The addresses of an alias; `None` when it cannot be resolved here (`autogroup:self`),
    /// and `ok = false` when resolution reported an error (an unknown user).
    fn resolve(&self, a: &Alias) -> (Option<IpSet>, bool) {
        let mut s = IpSet::default();
        let mut ok = true;
        match a {
            Alias::Wildcard => s = IpSet::all(),
            Alias::User(u) => (s, ok) = self.user_set(u),
            Alias::Group(g) => {
                for u in self.pol.groups.get(g).into_iter().flatten() {
                    let (us, uok) = self.user_set(u);
                    s.add_set(&us);
                    ok &= uok;
                }
            }
            Alias::Tag(t) => {
                for n in self.nodes.iter().filter(|n| n.tags.iter().any(|x| x == t)) {
                    n.add_to(&mut s);
                }
            }
            Alias::Host(h) => {
                let Some(p) = self.pol.hosts.get(h) else { return (None, false) };
                s.add_prefix(*p);
                self.add_node_of(&mut s, p);
                let snapshot = s.clone();
                for n in self.nodes.iter().filter(|n| n.in_set(&snapshot)) {
                    n.add_to(&mut s);
                }
            }
            Alias::Prefix(p) => {
                s.add_prefix(*p);
                self.add_node_of(&mut s, p);
            }
            Alias::Auto(AutoGroup::Internet) => s = ipset::the_internet(),
            Alias::Auto(AutoGroup::Member) => {
                for n in self.nodes.iter().filter(|n| !n.tagged()) {
                    n.add_to(&mut s);
                }
            }
            Alias::Auto(AutoGroup::Tagged) => {
                for n in self.nodes.iter().filter(|n| n.tagged()) {
                    n.add_to(&mut s);
                }
            }
            Alias::Auto(AutoGroup::SelfDevices | AutoGroup::NonRoot) => return (None, false),
        }
        (Some(s), ok)
    }

    fn dst_ports(&self, dsts: &[&(Alias, Vec<PortRange>)]) -> Vec<NetPortRange> {
        let mut out = vec![];
        for (alias, ports) in dsts {
            let (Some(set), _) = self.resolve(alias) else { continue };
            for p in set.prefixes() {
                for r in ports {
                    out.push(NetPortRange { ip: p.to_string(), ports: *r });
                }
            }
        }
        out
    }

    /// `compileFilterRules`: one list for the whole tailnet.
    fn global(&self) -> Vec<FilterRule> {
        let Some(acls) = &self.pol.acls else { return filter_allow_all() };
        let mut rules = vec![];
        for acl in acls {
            let mut src = IpSet::default();
            for a in &acl.src {
                if let (Some(s), _) = self.resolve(a) {
                    src.add_set(&s);
                }
            }
            if src.is_empty() {
                continue;
            }
            let dst = self.dst_ports(&acl.dst.iter().collect::<Vec<_>>());
            if dst.is_empty() {
                continue;
            }
            rules.push(FilterRule { src_ips: src.prefix_strings(), dst_ports: dst, ip_proto: acl.proto.clone() });
        }
        rules
    }

    /// `compileFilterRulesForNode`: rules as `node` sees them, `autogroup:self` expanded.
    fn for_node(&self, node: &PolicyNode) -> Vec<FilterRule> {
        let mut rules = vec![];
        for acl in self.pol.acls.iter().flatten() {
            let is_self = |d: &&(Alias, Vec<PortRange>)| d.0 == Alias::Auto(AutoGroup::SelfDevices);
            let self_dsts: Vec<_> = acl.dst.iter().filter(is_self).collect();
            let other_dsts: Vec<_> = acl.dst.iter().filter(|d| !is_self(d)).collect();
            // A source whose resolution reports an error is skipped here (not in `global`).
            let srcs: Vec<IpSet> = acl
                .src
                .iter()
                .filter_map(|a| match self.resolve(a) {
                    (Some(s), true) => Some(s),
                    _ => None,
                })
                .collect();
            if srcs.is_empty() {
                continue;
            }
            if !self_dsts.is_empty() {
                let same: Vec<&PolicyNode> =
                    self.nodes.iter().filter(|n| n.user_id == node.user_id && !n.tagged()).collect();
                let mut src = IpSet::default();
                for n in &same {
                    if srcs.iter().any(|s| n.in_set(s)) {
                        n.add_to(&mut src);
                    }
                }
                if !src.is_empty() {
                    let mut dst = vec![];
                    for (_, ports) in &self_dsts {
                        for n in &same {
                            for r in ports {
                                for ip in n.ips() {
                                    dst.push(NetPortRange { ip: ip.to_string(), ports: *r });
                                }
                            }
                        }
                    }
                    if !dst.is_empty() {
                        rules.push(FilterRule {
                            src_ips: src.prefix_strings(),
                            dst_ports: dst,
                            ip_proto: acl.proto.clone(),
                        });
                    }
                }
            }
            if !other_dsts.is_empty() {
                let mut src = IpSet::default();
                for s in &srcs {
                    src.add_set(s);
                }
                if !src.is_empty() {
                    let dst = self.dst_ports(&other_dsts);
                    if !dst.is_empty() {
                        rules.push(FilterRule {
                            src_ips: src.prefix_strings(),
                            dst_ports: dst,
                            ip_proto: acl.proto.clone(),
                        });
                    }
                }
            }
        }
        rules
    }
}

/// Node indices a node "touches" under `ms`: those it may open connections to and those that
/// may open connections to it.
fn touches(me: &PolicyNode, nodes: &[PolicyNode], ms: &[Matcher]) -> Vec<u64> {
    let words = nodes.len().div_ceil(64);
    let mut out = vec![0u64; words];
    let in_set = |s: &IpSet| -> Vec<u64> {
        let mut b = vec![0u64; words];
        for (i, n) in nodes.iter().enumerate() {
            if n.in_set(s) {
                b[i / 64] |= 1 << (i % 64);
            }
        }
        b
    };
    let dst_of = |m: &Matcher| -> Vec<u64> {
        let mut b = vec![0u64; words];
        for (i, n) in nodes.iter().enumerate() {
            if m.dst_has(n) {
                b[i / 64] |= 1 << (i % 64);
            }
        }
        b
    };
    for m in ms {
        let (src, dst) = (me.in_set(&m.srcs), m.dst_has(me));
        if src {
            for (o, w) in out.iter_mut().zip(dst_of(m)) {
                *o |= w;
            }
        }
        if dst {
            for (o, w) in out.iter_mut().zip(in_set(&m.srcs)) {
                *o |= w;
            }
        }
    }
    out
}

impl Policy {
    /// True when the policy has any `autoApprovers`.
    pub fn has_auto_approvers(&self) -> bool {
        !self.auto.routes.is_empty() || !self.auto.exit.is_empty()
    }

    fn approver_has(&self, users: &[PolicyUser], a: &Alias, node: &PolicyNode) -> bool {
        let r = Resolver { pol: self, users, nodes: &[] };
        let is_user = |u: &str| !node.tagged() && r.user_id(u) == Some(node.user_id);
        match a {
            Alias::User(u) => is_user(u),
            Alias::Group(g) => self.groups.get(g).into_iter().flatten().any(|u| is_user(u)),
            Alias::Tag(t) => node.tags.iter().any(|x| x == t),
            _ => false,
        }
    }

    /// Headscale's `NodeCanApproveRoute`: an exit route needs `exitNode`; any other route an
    /// entry of `routes` whose prefix contains it, with `node` among its approvers.
    pub fn node_can_approve_route(&self, users: &[PolicyUser], node: &PolicyNode, route: &Prefix) -> bool {
        let any = |list: &[(Alias, String)]| list.iter().any(|(a, _)| self.approver_has(users, a, node));
        if route.len == 0 {
            return any(&self.auto.exit);
        }
        self.auto.routes.iter().any(|(p, list)| {
            let mut covers = IpSet::default();
            covers.add_prefix(*p);
            p.len <= route.len && covers.overlaps_prefix(route) && any(list)
        })
    }

    /// Headscale's `ApproveRoutesWithPolicy`: the approved routes plus every announced one the
    /// policy approves (never fewer), or `None` when nothing is added.
    pub fn auto_approved(
        &self,
        users: &[PolicyUser],
        node: &PolicyNode,
        approved: &[Prefix],
        announced: &[Prefix],
    ) -> Option<Vec<Prefix>> {
        let added: Vec<Prefix> = announced
            .iter()
            .filter(|r| !approved.contains(r) && self.node_can_approve_route(users, node, r))
            .copied()
            .collect();
        if added.is_empty() {
            return None;
        }
        let mut out: Vec<Prefix> = approved.iter().chain(&added).copied().collect();
        out.sort_by_key(|p| (p.addr.is_ipv6(), p.len, p.addr));
        out.dedup();
        Some(out)
    }

    /// Compiles the policy for these users and nodes.
    pub fn compile(&self, users: &[PolicyUser], nodes: &[PolicyNode]) -> Compiled {
        let r = Resolver { pol: self, users, nodes };
        let n = nodes.len();
        let index = nodes.iter().enumerate().map(|(i, x)| (x.id, i)).collect();
        let (rules, touch, ms) = if self.uses_autogroup_self() {
            let per: Vec<Vec<Rule>> =
                nodes.iter().map(|x| r.for_node(x).into_iter().map(Rule::new).collect()).collect();
            let ms: Vec<Vec<Matcher>> = per.iter().map(|rs| matchers(rs)).collect();
            let touch: Vec<Vec<u64>> = nodes.iter().zip(&ms).map(|(x, m)| touches(x, nodes, m)).collect();
            (RulesBy::PerNode(per), Touch::Rows(touch), MatchersBy::PerNode(ms))
        } else {
            let global: Vec<Rule> = r.global().into_iter().map(Rule::new).collect();
            let ms = matchers(&global);
            let touch = precompute_global_touch(nodes, &ms);
            (RulesBy::Global(global), Touch::Flat(touch), MatchersBy::Global(ms))
        };
        // Symmetric closure: a peer when either side's rules connect the two. The shared
        // rule list's touch is symmetric already (see `precompute_global_touch`), so only
        // per-node rules need it: the bit-by-bit pass costs nodes squared, 100 million steps
        // at 10,000 nodes, on every membership change.
        let words = n.div_ceil(64);
        let mut peers = match touch {
            Touch::Flat(flat) => flat,
            Touch::Rows(touch) => {
                let mut flat: Vec<u64> = touch.concat();
                for (i, row) in touch.iter().enumerate() {
                    for j in 0..n {
                        if row[j / 64] >> (j % 64) & 1 == 1 {
                            flat[j * words + i / 64] |= 1 << (i % 64);
                        }
                    }
                }
                flat
            }
        };
        for i in 0..n {
            peers[i * words + i / 64] &= !(1 << (i % 64));
        }
        debug_assert_eq!(peers.len(), n * words);
        let routers = nodes.iter().filter(|x| x.exit || !x.routes.is_empty()).map(|x| x.id).collect();
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Compiled { nodes: nodes.to_vec(), index, rules, peers, words, matchers: ms, routers, serial, extends: None }
    }
}

/// Which nodes each node touches: one row per node, or rows laid end to end.
enum Touch {
    Rows(Vec<Vec<u64>>),
    Flat(Vec<u64>),
}

/// [`touches`] for every node under one shared rule list, sharing the per-matcher bitsets.
/// Symmetric: `i` touches `j` when some rule has one in its sources and the other in its
/// destinations, either way round.
fn precompute_global_touch(nodes: &[PolicyNode], ms: &[Matcher]) -> Vec<u64> {
    let words = nodes.len().div_ceil(64);
    let bits = |s: &IpSet| -> Vec<u64> {
        let mut b = vec![0u64; words];
        for (i, n) in nodes.iter().enumerate() {
            if n.in_set(s) {
                b[i / 64] |= 1 << (i % 64);
            }
        }
        b
    };
    let dst_bits = |m: &Matcher| -> Vec<u64> {
        let mut b = vec![0u64; words];
        for (i, n) in nodes.iter().enumerate() {
            if m.dst_has(n) {
                b[i / 64] |= 1 << (i % 64);
            }
        }
        b
    };
    let sets: Vec<(Vec<u64>, Vec<u64>)> = ms.iter().map(|m| (bits(&m.srcs), dst_bits(m))).collect();
    // One allocation for the whole matrix: a row apiece was 10,000 allocations per compile.
    let mut out = vec![0u64; nodes.len() * words];
    for (i, row) in out.chunks_exact_mut(words.max(1)).enumerate().take(nodes.len()) {
        for (s, d) in &sets {
            let (in_s, in_d) = (s[i / 64] >> (i % 64) & 1 == 1, d[i / 64] >> (i % 64) & 1 == 1);
            if in_s {
                for (o, w) in row.iter_mut().zip(d) {
                    *o |= w;
                }
            }
            if in_d {
                for (o, w) in row.iter_mut().zip(s) {
                    *o |= w;
                }
            }
        }
    }
    out
}

impl Compiled {
    /// Node index `i`'s row of peer bits.
    fn row(&self, i: usize) -> &[u64] {
        &self.peers[i * self.words..(i + 1) * self.words]
    }

    /// The unreduced rules node `id` was compiled with (the tailnet's list without
    /// `autogroup:self`).
    pub fn rules_for(&self, id: u64) -> Vec<FilterRule> {
        let rules = match &self.rules {
            RulesBy::Global(g) => g,
            RulesBy::PerNode(p) => match self.index.get(&id) {
                Some(&i) => &p[i],
                None => return vec![],
            },
        };
        rules.iter().map(|r| r.rule.clone()).collect()
    }

    /// Node `id`'s packet filter: the rules with only the destinations holding one of its
    /// addresses (`ReduceFilterRules`). Empty for an unknown node.
    pub fn filter_for(&self, id: u64) -> Vec<FilterRule> {
        let Some(&i) = self.index.get(&id) else { return vec![] };
        let node = &self.nodes[i];
        let rules = match &self.rules {
            RulesBy::Global(g) => g,
            RulesBy::PerNode(p) => &p[i],
        };
        let mut out = vec![];
        for r in rules {
            let dst: Vec<NetPortRange> = r
                .rule
                .dst_ports
                .iter()
                .zip(&r.dst_sets)
                .filter(|(_, set)| set.as_ref().is_some_and(|s| node.in_set(s) || node.routes_overlap(s)))
                .map(|(d, _)| d.clone())
                .collect();
            if dst.is_empty() {
                continue;
            }
            // A rule that differs from the one before only in its (explicit) protocols is
            // that rule with more protocols: the built-in policy's TCP/UDP and ICMP rules go as
            // one, half the filter that every map and every member change carries.
            if let Some(prev) = out.last_mut().filter(|p: &&mut FilterRule| {
                p.src_ips == r.rule.src_ips
                    && p.dst_ports == dst
                    && !p.ip_proto.is_empty()
                    && !r.rule.ip_proto.is_empty()
            }) {
                for proto in &r.rule.ip_proto {
                    if !prev.ip_proto.contains(proto) {
                        prev.ip_proto.push(*proto);
                    }
                }
                continue;
            }
            out.push(FilterRule { src_ips: r.rule.src_ips.clone(), dst_ports: dst, ip_proto: r.rule.ip_proto.clone() });
        }
        out
    }

    /// Ids of the nodes in node `id`'s map (ascending).
    pub fn peers_of(&self, id: u64) -> Vec<u64> {
        let Some(&i) = self.index.get(&id) else { return vec![] };
        let mut out: Vec<u64> = (0..self.nodes.len())
            .filter(|&j| self.row(i)[j / 64] >> (j % 64) & 1 == 1)
            .map(|j| self.nodes[j].id)
            .collect();
        out.sort_unstable();
        out
    }

    /// Headscale's `ReduceRoutes` for `viewer`: true when the viewer may reach `route` under
    /// the rules it was compiled with. False for an unknown viewer.
    pub fn can_access_route(&self, viewer: u64, route: &Prefix) -> bool {
        let Some(&i) = self.index.get(&viewer) else { return false };
        let ms = match &self.matchers {
            MatchersBy::Global(g) => g,
            MatchersBy::PerNode(p) => &p[i],
        };
        ms.iter().any(|m| m.allows_route(&self.nodes[i], route))
    }

    /// Ids of the nodes serving routes (subnet or exit), ascending: a change of one of them
    /// may change which node is primary for a route, and so other nodes' entries.
    pub fn routers(&self) -> &[u64] {
        &self.routers
    }

    /// The peers node `me` gains and loses from compile `old` to this one, by ascending id:
    /// `(added, removed)`. When the nodes are `old`'s with more after them (a join: ids only
    /// grow), only the bits that differ are visited; else both peer lists are merged.
    pub fn peer_changes(&self, old: &Compiled, me: u64) -> (Vec<u64>, Vec<u64>) {
        fn row(c: &Compiled, me: u64) -> &[u64] {
            c.index.get(&me).map(|&i| c.row(i)).unwrap_or(&[])
        }
        let (new_row, old_row) = (row(self, me), row(old, me));
        let (mut added, mut removed) = (vec![], vec![]);
        let set_bits = |w: u64, base: usize, nodes: &[PolicyNode], out: &mut Vec<u64>| {
            let mut w = w;
            while w != 0 {
                out.push(nodes[base + w.trailing_zeros() as usize].id);
                w &= w - 1;
            }
        };
        if self.extends == Some(old.serial) || self.begins_with(old) {
            for (k, &n) in new_row.iter().enumerate() {
                let o = old_row.get(k).copied().unwrap_or(0);
                set_bits(n & !o, k * 64, &self.nodes, &mut added);
                set_bits(o & !n, k * 64, &old.nodes, &mut removed);
            }
            return (added, removed);
        }
        let ids_of = |r: &[u64], nodes: &[PolicyNode]| {
            let mut out = vec![];
            for (k, &w) in r.iter().enumerate() {
                set_bits(w, k * 64, nodes, &mut out);
            }
            out
        };
        let (new, old) = (ids_of(new_row, &self.nodes), ids_of(old_row, &old.nodes));
        let (mut a, mut b) = (new.iter().peekable(), old.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x == y => {
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x < y => added.push(*a.next().unwrap()),
                (Some(_), Some(_)) | (None, Some(_)) => removed.push(*b.next().unwrap()),
                (Some(_), None) => added.push(*a.next().unwrap()),
                (None, None) => return (added, removed),
            }
        }
    }

    /// Notes that this compile's nodes are `prev`'s with more after them, when they are:
    /// checked once here, not by every stream in [`Compiled::peer_changes`].
    pub fn after(mut self, prev: &Compiled) -> Compiled {
        if self.begins_with(prev) {
            self.extends = Some(prev.serial);
        }
        self
    }

    /// Which of node `router`'s served routes (its subnet routes, then both exit routes if it
    /// serves them) `viewer` may use under this compile: what reduces `router`'s entry in
    /// `viewer`'s map. Empty for an unknown node.
    pub fn route_view(&self, viewer: u64, router: u64) -> Vec<bool> {
        // Parsed once: every stream of a recompiled org asks this for every router.
        static EXITS: std::sync::LazyLock<Vec<Prefix>> =
            std::sync::LazyLock::new(|| ["0.0.0.0/0", "::/0"].iter().filter_map(|p| Prefix::parse(p)).collect());
        let Some(&i) = self.index.get(&router) else { return vec![] };
        let n = &self.nodes[i];
        let exits: &[Prefix] = if n.exit { &EXITS } else { &[] };
        n.routes.iter().chain(exits).map(|p| self.can_access_route(viewer, p)).collect()
    }

    /// True when this compile's nodes begin with `prev`'s, in the same order.
    fn begins_with(&self, prev: &Compiled) -> bool {
        prev.nodes.len() <= self.nodes.len() && self.nodes.iter().zip(&prev.nodes).all(|(a, b)| a.id == b.id)
    }

    /// Node `id`'s user, `None` for an unknown node.
    pub fn user_of(&self, id: u64) -> Option<u64> {
        self.index.get(&id).map(|&i| self.nodes[i].user_id)
    }

    /// True when `a` and `b` are in each other's maps (they may talk in some direction).
    pub fn may_talk(&self, a: u64, b: u64) -> bool {
        match (self.index.get(&a), self.index.get(&b)) {
            (Some(&i), Some(&j)) => i != j && self.row(i)[j / 64] >> (j % 64) & 1 == 1,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
