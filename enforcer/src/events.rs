//! The stream of flow verdicts: kernel events (`enforcer_common::Event`) turned into
//! [`FlowEvent`]s — JSON lines whose field names are a stable interface — and fanned out to
//! every subscriber (the `/flows` endpoint, the flow log) through an [`EventHub`], which also
//! keeps the most recent events for `--since` queries.
use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use enforcer_common::{Event, NO_RULE, counter, direction};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One reported packet. Field names are a stable interface: scripts and dashboards read them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub iface: String,
    /// `ingress` or `egress`.
    pub direction: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP ports (null for other protocols).
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    /// ICMP/ICMPv6 message type (null for other protocols).
    pub icmp_type: Option<u8>,
    pub src_segment: String,
    pub dst_segment: String,
    /// `allow`, `deny` or `audit` (the words of `policy-compiler trace`).
    pub verdict: String,
    /// The outcome: `allowed`, `audit`, `policy_denied`, `flow_revoked`, `conntrack_full`,
    /// `breakglass` (allowed by a break-glass grant), `breakglass_expired` (a flow the grant had
    /// admitted, cut after it ended or was revoked).
    pub reason: String,
    /// The id of the rule that allowed the flow, or null; `breakglass/<id>` names the grant
    /// (for `breakglass_expired`, the grant that had admitted the flow).
    pub rule: Option<String>,
    /// Revision (content hash) of the policy that judged the packet.
    pub revision: String,
}

impl FlowEvent {
    pub fn system_time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.time).ok()
    }

    /// Appends the event as one JSON object and a newline: byte for byte what `serde_json`
    /// writes for it (tested), at a fraction of the cost. During a scan the event stream
    /// serializes a million of these a second, and serde's per-field escaping was a third of
    /// that work.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        let text = |out: &mut Vec<u8>, key: &str, value: &str| {
            out.extend_from_slice(key.as_bytes());
            push_json_str(out, value);
        };
        let number = |out: &mut Vec<u8>, key: &str, value: Option<u16>| {
            out.extend_from_slice(key.as_bytes());
            match value {
                Some(value) => push_decimal(out, value),
                None => out.extend_from_slice(b"null"),
            }
        };
        text(out, "{\"time\":", &self.time);
        text(out, ",\"iface\":", &self.iface);
        text(out, ",\"direction\":", &self.direction);
        out.extend_from_slice(b",\"src\":");
        push_addr(out, self.src);
        out.extend_from_slice(b",\"dst\":");
        push_addr(out, self.dst);
        number(out, ",\"sport\":", self.sport);
        number(out, ",\"dport\":", self.dport);
        text(out, ",\"proto\":", &self.proto);
        number(out, ",\"icmp_type\":", self.icmp_type.map(u16::from));
        text(out, ",\"src_segment\":", &self.src_segment);
        text(out, ",\"dst_segment\":", &self.dst_segment);
        text(out, ",\"verdict\":", &self.verdict);
        text(out, ",\"reason\":", &self.reason);
        match &self.rule {
            Some(rule) => text(out, ",\"rule\":", rule),
            None => out.extend_from_slice(b",\"rule\":null"),
        }
        text(out, ",\"revision\":", &self.revision);
        out.extend_from_slice(b"}\n");
    }
}

/// `value` in decimal, without going through `core::fmt`.
fn push_decimal(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// An address as a JSON string, as its `Display` writes it.
fn push_addr(out: &mut Vec<u8>, addr: IpAddr) {
    use std::io::Write as _;
    out.push(b'"');
    match addr {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u16::from(octet));
            }
        }
        // Writing into a Vec cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
    out.push(b'"');
}

/// A JSON string: copied as is unless it holds a character JSON must escape (control
/// characters, `"` and `\\`), which `serde_json` escapes so the output stays the same.
fn push_json_str(out: &mut Vec<u8>, value: &str) {
    if value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    } else {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    }
}

/// The names a loaded policy gives to the ids in kernel events.
#[derive(Clone, Debug, Default)]
pub struct PolicyNames {
    pub generation: u32,
    pub revision: String,
    /// Indexed by segment id (`world` is 0).
    pub segments: Vec<String>,
    /// Indexed by global rule index. Shared with the previous generation when the ids are the
    /// same: a daemon keeps several generations.
    pub rules: Arc<RuleIds>,
}

impl PolicyNames {
    /// The names of `artifact`, loaded as policy generation `generation`.
    pub fn of(generation: u32, artifact: &policy_compiler::Artifact) -> Self {
        PolicyNames {
            generation,
            revision: artifact.revision.clone(),
            segments: artifact.segments.iter().map(|s| s.name.clone()).collect(),
            rules: Arc::new(artifact.rules.iter().map(|rule| &rule.id).collect()),
        }
    }
}

/// The ids of a policy's rules by global rule index, in one string: about 1 MiB for the ids of
/// a 100k-rule policy, against 5 MiB as 100k strings of their own (each an allocation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleIds {
    text: String,
    /// Where each id ends in `text`; it starts where the one before it ends.
    ends: Vec<u32>,
}

impl RuleIds {
    /// The id of rule `index`.
    pub fn get(&self, index: usize) -> Option<&str> {
        let end = *self.ends.get(index)? as usize;
        let start = index
            .checked_sub(1)
            .map_or(0, |before| self.ends[before] as usize);
        self.text.get(start..end)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).filter_map(|index| self.get(index))
    }
}

impl<S: AsRef<str>> FromIterator<S> for RuleIds {
    /// Ids past 4 GiB of text in all are left out (no policy comes near).
    fn from_iter<I: IntoIterator<Item = S>>(ids: I) -> Self {
        let mut rules = RuleIds::default();
        for id in ids {
            let id = id.as_ref();
            let Ok(end) = u32::try_from(rules.text.len() + id.len()) else {
                break;
            };
            rules.text.push_str(id);
            rules.ends.push(end);
        }
        rules.text.shrink_to_fit();
        rules.ends.shrink_to_fit();
        rules
    }
}

/// Turns kernel events into [`FlowEvent`]s, with the names of the policy generation that
/// produced each (the last few generations are kept, so events from just before a reload
/// still get the right names).
#[derive(Default)]
pub struct EventNamer {
    policies: VecDeque<Arc<PolicyNames>>,
    /// Wall-clock time minus the kernel programs' clock, to date kernel timestamps.
    wall_offset: Duration,
}

const KEPT_GENERATIONS: usize = 8;

impl EventNamer {
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        EventNamer {
            policies: VecDeque::new(),
            wall_offset: wall
                .saturating_sub(Duration::from_nanos(crate::clock::monotonic_now_ns())),
        }
    }

    pub fn add_policy(&mut self, names: Arc<PolicyNames>) {
        let names = match self.policies.back() {
            Some(previous)
                if previous.rules == names.rules && !Arc::ptr_eq(&previous.rules, &names.rules) =>
            {
                let mut names = Arc::unwrap_or_clone(names);
                names.rules = Arc::clone(&previous.rules);
                Arc::new(names)
            }
            _ => names,
        };
        self.policies.push_back(names);
        while self.policies.len() > KEPT_GENERATIONS {
            self.policies.pop_front();
        }
    }

    pub fn policy(&self, generation: u32) -> Option<&Arc<PolicyNames>> {
        self.policies
            .iter()
            .rev()
            .find(|p| p.generation == generation)
    }

    /// The [`FlowEvent`] of a kernel event seen on interface `iface`.
    pub fn name(&self, event: &Event, iface: String) -> FlowEvent {
        let policy = self.policy(event.generation);
        let segment = |id: u32| {
            policy
                .and_then(|p| p.segments.get(id as usize).cloned())
                .unwrap_or_else(|| format!("segment#{id}"))
        };
        let outcome = u32::from(event.counter);
        let rule = match outcome {
            // The rule is the id of the grant that admitted the flow.
            counter::BREAKGLASS | counter::DROP_BREAKGLASS_EXPIRED => {
                Some(policy_compiler::breakglass::rule_id(event.rule))
            }
            _ => (event.rule != NO_RULE).then(|| {
                policy
                    .and_then(|p| p.rules.get(event.rule as usize).map(str::to_string))
                    .unwrap_or_else(|| format!("rule#{}", event.rule))
            }),
        };
        let addr = |bytes: &[u8; 16]| -> IpAddr {
            if event.family == 4 {
                IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(*bytes))
            }
        };
        let (proto, ports, icmp_type) = match event.proto {
            6 => ("tcp".to_string(), true, None),
            17 => ("udp".to_string(), true, None),
            1 => ("icmp".to_string(), false, Some(event.icmp_type)),
            58 => ("icmpv6".to_string(), false, Some(event.icmp_type)),
            other => (other.to_string(), false, None),
        };
        let verdict = match outcome {
            counter::AUDIT => "audit",
            c if counter::is_drop(c) => "deny",
            _ => "allow",
        };
        let time = SystemTime::UNIX_EPOCH + self.wall_offset + Duration::from_nanos(event.time_ns);
        FlowEvent {
            time: humantime::format_rfc3339_millis(time).to_string(),
            iface,
            direction: direction::NAMES
                .get(usize::from(event.direction))
                .unwrap_or(&"?")
                .to_string(),
            src: addr(&event.src),
            dst: addr(&event.dst),
            sport: ports.then_some(event.sport),
            dport: ports.then_some(event.dport),
            proto,
            icmp_type,
            src_segment: segment(event.src_segment),
            dst_segment: segment(event.dst_segment),
            verdict: verdict.to_string(),
            reason: counter::NAMES
                .get(outcome as usize)
                .unwrap_or(&"?")
                .to_string(),
            rule,
            revision: policy.map(|p| p.revision.clone()).unwrap_or_default(),
        }
    }
}

/// Fans events out to subscribers and keeps the most recent ones.
pub struct EventHub {
    sender: broadcast::Sender<Arc<FlowEvent>>,
    recent: Mutex<VecDeque<Arc<FlowEvent>>>,
    recent_capacity: usize,
    /// Events slow subscribers missed (`enforcer_flow_subscriber_missed_total`).
    lagged: AtomicU64,
}

impl EventHub {
    pub fn new(channel_capacity: usize, recent_capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(channel_capacity.max(1));
        EventHub {
            sender,
            recent: Mutex::new(VecDeque::with_capacity(recent_capacity)),
            recent_capacity,
            lagged: AtomicU64::new(0),
        }
    }

    pub fn publish(&self, event: FlowEvent) {
        let event = Arc::new(event);
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == self.recent_capacity {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No subscriber is not an error: the event is still in `recent`.
        let _ = self.sender.send(event);
    }

    /// A live feed of events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowEvent>> {
        self.sender.subscribe()
    }

    /// Kept events at or after `since` (all kept events for `None`), oldest first.
    pub fn recent(&self, since: Option<SystemTime>) -> Vec<Arc<FlowEvent>> {
        let Ok(recent) = self.recent.lock() else {
            return Vec::new();
        };
        recent
            .iter()
            .filter(|event| match (since, event.system_time()) {
                (Some(since), Some(time)) => time >= since,
                _ => true,
            })
            .cloned()
            .collect()
    }

    /// Records that a subscriber fell behind and missed `count` events.
    pub fn record_lag(&self, count: u64) {
        self.lagged.fetch_add(count, Ordering::Relaxed);
    }

    pub fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{EventNamer, FlowEvent, PolicyNames, RuleIds};

    fn names(generation: u32, rules: &[&str]) -> Arc<PolicyNames> {
        Arc::new(PolicyNames {
            generation,
            revision: format!("r{generation}"),
            segments: vec!["world".into()],
            rules: Arc::new(rules.iter().collect()),
        })
    }

    #[test]
    fn rule_ids_are_found_by_index() {
        let ids: RuleIds = ["pacs/1", "", "lab/ü-9"].iter().collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(
            (0..4).map(|index| ids.get(index)).collect::<Vec<_>>(),
            [Some("pacs/1"), Some(""), Some("lab/ü-9"), None]
        );
        assert_eq!(ids.iter().collect::<Vec<_>>(), ["pacs/1", "", "lab/ü-9"]);
        assert!(RuleIds::default().is_empty());
    }

    #[test]
    fn the_names_of_an_artifact_follow_its_segment_and_rule_ids() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../segments");
        let policy = policy_compiler::Policy::load_dir(&dir).expect("the example policy");
        let artifact = policy_compiler::compile(&policy).expect("it compiles");
        let names = PolicyNames::of(7, &artifact);
        assert_eq!((names.generation, &names.revision), (7, &artifact.revision));
        let segments: Vec<&str> = artifact.segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.segments, segments);
        assert!(artifact.rules.len() > 10);
        assert_eq!(
            names.rules.iter().collect::<Vec<_>>(),
            artifact
                .rules
                .iter()
                .map(|rule| rule.id.as_str())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn generations_with_the_same_rule_ids_share_them() {
        let mut namer = EventNamer::new();
        namer.add_policy(names(1, &["pacs/1", "pacs/2", "lab/1"]));
        namer.add_policy(names(2, &["pacs/1", "pacs/2", "lab/1"]));
        namer.add_policy(names(3, &["pacs/2", "pacs/1", "lab/9"]));
        let [one, two, three] = [1, 2, 3].map(|generation| namer.policy(generation).unwrap());
        assert!(Arc::ptr_eq(&one.rules, &two.rules));
        assert!(!Arc::ptr_eq(&two.rules, &three.rules));
        assert_eq!(
            two.rules.iter().collect::<Vec<_>>(),
            ["pacs/1", "pacs/2", "lab/1"]
        );
        assert_eq!(
            three.rules.iter().collect::<Vec<_>>(),
            ["pacs/2", "pacs/1", "lab/9"]
        );
    }

    #[test]
    fn the_json_line_writer_matches_serde_json_byte_for_byte() {
        let texts = [
            "",
            "pacs",
            "segment#7",
            "pacs/allow/1",
            "breakglass/42",
            "quote \" inside",
            "back\\slash",
            "tab\tnew\nline\r",
            "\u{0}\u{1f}\u{7f}",
            "unicode é ü 東京 🚑",
            "slash / and </script>",
        ];
        let addrs: [std::net::IpAddr; 6] = [
            "10.1.2.3".parse().unwrap(),
            "0.0.0.0".parse().unwrap(),
            "255.199.100.9".parse().unwrap(),
            "192.0.2.10".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            "::ffff:10.0.0.1".parse().unwrap(),
        ];
        let mut checked = 0;
        for (i, text) in texts.iter().enumerate() {
            for (j, other) in texts.iter().enumerate() {
                let pick = |k: usize| texts[(i + j + k) % texts.len()].to_string();
                let event = FlowEvent {
                    time: pick(0),
                    iface: text.to_string(),
                    direction: pick(1),
                    src: addrs[i % addrs.len()],
                    dst: addrs[(i + j) % addrs.len()],
                    sport: (j % 2 == 0).then_some(u16::MAX - (i * 997) as u16),
                    dport: (i % 3 != 0).then_some((j * j * 101) as u16),
                    proto: pick(2),
                    icmp_type: (j % 3 == 0).then_some(u8::MAX - (i * 23) as u8),
                    src_segment: other.to_string(),
                    dst_segment: pick(3),
                    verdict: pick(4),
                    reason: pick(5),
                    rule: (i % 2 == 1).then(|| pick(6)),
                    revision: pick(7),
                };
                let mut want = serde_json::to_vec(&event).unwrap();
                want.push(b'\n');
                let mut got = b"kept".to_vec();
                event.write_json_line(&mut got);
                assert_eq!(
                    String::from_utf8_lossy(&got[4..]),
                    String::from_utf8_lossy(&want),
                    "{event:?}"
                );
                assert_eq!(&got[..4], b"kept", "appends");
                checked += 1;
            }
        }
        assert_eq!(checked, texts.len() * texts.len());
    }
}
