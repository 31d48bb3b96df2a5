//! A JSON Schema (draft 2020-12) of the policy files, for editors that validate YAML as you type
//! (`policy-compiler schema`). It catches the shape of a file: fields, enums, patterns. The
//! compiler's `check` stays the authority: it also knows what a schema cannot say (names of
//! other segments, overlapping members, host bits).

use serde_json::{Value, json};

use crate::model::RESERVED_SEGMENT_NAMES;
use crate::overrides::QUARANTINE;

/// `tcp/N`, `tcp/A-B`, `tcp/any`, the same for udp, `icmp/TYPE`, `icmpv6/TYPE`, `any`.
pub const PORT_PATTERN: &str =
    r"^(any|(tcp|udp)/(any|\d+(-\d+)?)|(icmp|icmpv6)/(any|[a-z-]+|\d+))$";
pub const SEGMENT_NAME_PATTERN: &str = "^[a-z0-9-]+$";
pub const RULE_NAME_PATTERN: &str = r"^[A-Za-z0-9._/-]+$";
/// Loose on purpose: the compiler checks addresses exactly and explains what is wrong.
const IPV4_PREFIX_PATTERN: &str = r"^\d{1,3}(\.\d{1,3}){3}(/\d{1,2})?$";
const IPV6_PREFIX_PATTERN: &str = r"^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/\d{1,3})?$";

/// The schema of a segment file or `defaults.yaml`.
pub fn policy_schema() -> Value {
    let one_or_list = |item: Value| {
        json!({
            "oneOf": [
                item.clone(),
                { "type": "array", "items": item, "minItems": 1 }
            ]
        })
    };
    let optional_text = json!({ "type": ["string", "null"] });
    let address = json!({
        "type": "string",
        "anyOf": [
            { "pattern": IPV4_PREFIX_PATTERN },
            { "pattern": IPV6_PREFIX_PATTERN }
        ]
    });
    let duration = json!({
        "description": "seconds, or a number with a unit: 30s, 5m, 2h, 5d",
        "anyOf": [
            { "type": "integer", "minimum": 1 },
            { "type": "string", "pattern": r"^\d+[smhd]?$" }
        ]
    });
    let table_size = json!({
        "anyOf": [
            { "type": "integer", "minimum": 1, "maximum": 16_777_216 },
            { "type": "string", "pattern": r"^\d+$" }
        ]
    });
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Segment policy file",
        "description": "One segment per file (segments/NAME.yaml with `segment: NAME`), or the policy-wide segments/defaults.yaml. `policy-compiler check` validates what a schema cannot: segment names in `from`, overlapping members, host bits.",
        "oneOf": [
            { "$ref": "#/$defs/segment" },
            { "$ref": "#/$defs/quarantine" },
            { "$ref": "#/$defs/defaults" }
        ],
        "$defs": {
            "segmentName": {
                "type": "string",
                "pattern": SEGMENT_NAME_PATTERN,
                "not": { "enum": RESERVED_SEGMENT_NAMES.iter().chain([&QUARANTINE]).collect::<Vec<_>>() }
            },
            "quarantine": {
                "type": "object",
                "title": "The built-in quarantine segment (quarantine.yaml)",
                "description": "Hosts are moved into it at run time (`enforcer quarantine add`), never listed here; it is always enforced and intra: deny. The file only says who may reach quarantined hosts.",
                "required": ["segment"],
                "additionalProperties": false,
                "properties": {
                    "segment": { "const": QUARANTINE },
                    "description": optional_text,
                    "mode": { "const": "enforce" },
                    "intra": { "const": "deny" },
                    "allow": { "$ref": "#/$defs/rules" }
                }
            },
            "address": address,
            "port": {
                "type": "string",
                "pattern": PORT_PATTERN,
                "description": "tcp/N, tcp/A-B, tcp/any, the same for udp, icmp/TYPE and icmpv6/TYPE (a name such as echo-request, or a number), or any"
            },
            "source": {
                "type": "string",
                "description": "a segment name, world, any, or an address or prefix",
                "anyOf": [
                    { "pattern": SEGMENT_NAME_PATTERN },
                    { "pattern": IPV4_PREFIX_PATTERN },
                    { "pattern": IPV6_PREFIX_PATTERN }
                ]
            },
            "rule": {
                "type": "object",
                "description": "Who may reach the segment's members, on which ports",
                "required": ["from", "ports"],
                "additionalProperties": false,
                "properties": {
                    "name": {
                        "type": "string",
                        "pattern": RULE_NAME_PATTERN,
                        "description": "stable rule id (default SEGMENT/N)"
                    },
                    "from": one_or_list(json!({ "$ref": "#/$defs/source" })),
                    "ports": one_or_list(json!({ "$ref": "#/$defs/port" })),
                    "reason": optional_text
                }
            },
            "rules": {
                "oneOf": [
                    { "type": "null" },
                    { "type": "array", "items": { "$ref": "#/$defs/rule" } }
                ]
            },
            "segment": {
                "type": "object",
                "title": "Segment",
                "required": ["segment", "members"],
                "additionalProperties": false,
                "properties": {
                    "segment": {
                        "$ref": "#/$defs/segmentName",
                        "description": "the segment's name, equal to the file name"
                    },
                    "description": optional_text,
                    "members": one_or_list(json!({ "$ref": "#/$defs/address" })),
                    "mode": {
                        "enum": ["enforce", "monitor"],
                        "description": "monitor: would-be denials pass and are reported as audit"
                    },
                    "intra": {
                        "enum": ["allow", "deny"],
                        "description": "traffic between two members of the segment (default allow)"
                    },
                    "allow": { "$ref": "#/$defs/rules" }
                }
            },
            "defaults": {
                "type": ["object", "null"],
                "title": "defaults.yaml",
                "additionalProperties": false,
                "properties": {
                    "world": {
                        "type": ["object", "null"],
                        "additionalProperties": false,
                        "properties": {
                            "mode": { "enum": ["unenforced", "monitor", "enforce"] },
                            "allow": { "$ref": "#/$defs/rules" }
                        }
                    },
                    "on_policy_change": { "enum": ["recheck", "keep"] },
                    "egress": { "enum": ["unenforced", "monitor", "enforce"] },
                    "essential_traffic": {
                        "oneOf": [
                            { "$ref": "#/$defs/port" },
                            { "type": "array", "items": { "$ref": "#/$defs/port" } }
                        ]
                    },
                    "conntrack": {
                        "type": ["object", "null"],
                        "additionalProperties": false,
                        "properties": {
                            "max_entries": table_size.clone(),
                            "tcp_syn_timeout": duration.clone(),
                            "tcp_established_timeout": duration.clone(),
                            "tcp_closing_timeout": duration.clone(),
                            "udp_timeout": duration.clone(),
                            "icmp_timeout": duration.clone(),
                            "other_timeout": duration.clone()
                        }
                    },
                    "fragments": {
                        "type": ["object", "null"],
                        "additionalProperties": false,
                        "properties": {
                            "max_entries": table_size,
                            "timeout": duration.clone()
                        }
                    },
                    "breakglass": {
                        "type": ["object", "null"],
                        "additionalProperties": false,
                        "properties": {
                            "max_ttl": {
                                "allOf": [duration],
                                "description": "the longest TTL `enforcer breakglass grant` accepts (default 4h)"
                            }
                        }
                    }
                }
            }
        }
    })
}
