//! A small YAML tree that remembers where every node starts, built from yaml-rust2's event
//! parser (serde-based loaders lose value positions, and errors must name line and column).
//!
//! The tree is built with an explicit stack and nesting is capped, so hostile input can neither
//! overflow the stack nor allocate without bound through aliases (which are rejected).

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Deeper nesting than this is never needed by the policy language.
const MAX_DEPTH: usize = 32;

/// 1-based line and column of a node's first character.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_marker(mark: &Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos {
            line: mark.line().max(1),
            column: mark.col() + 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    pub fn kind_name(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing",
            Value::Scalar(_) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A YAML-level problem: position, message and an optional hint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
    pub hint: Option<String>,
}

enum Frame {
    Seq(Pos, Vec<Node>),
    Map(Pos, Vec<(Node, Node)>, Option<Node>),
}

/// Parses one YAML document. `Ok(None)` for an empty file (no document or an empty one).
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| SyntaxError {
            pos: Pos::from_marker(e.marker()),
            message: format!("YAML syntax: {}", e.info()),
            hint: Some("check indentation, quoting and brackets around this point".into()),
        })?;
        let pos = Pos::from_marker(&mark);
        let complete = match event {
            Event::StreamEnd => break,
            Event::StreamStart | Event::Nothing | Event::DocumentEnd => continue,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(SyntaxError {
                        pos,
                        message: "more than one YAML document in the file".into(),
                        hint: Some(
                            "remove the second `---` document; use one file per segment".into(),
                        ),
                    });
                }
                continue;
            }
            Event::Alias(_) => {
                return Err(SyntaxError {
                    pos,
                    message: "YAML aliases are not supported".into(),
                    hint: Some("write the value out instead of using `*alias`".into()),
                });
            }
            Event::Scalar(text, style, _, _) => {
                let is_null = style == TScalarStyle::Plain
                    && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL");
                let value = if is_null {
                    Value::Null
                } else {
                    Value::Scalar(text)
                };
                Node { value, pos }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(SyntaxError {
                        pos,
                        message: "YAML nested too deeply".into(),
                        hint: Some(format!(
                            "the policy language needs at most {MAX_DEPTH} levels"
                        )),
                    });
                }
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq(pos, Vec::new())
                } else {
                    Frame::Map(pos, Vec::new(), None)
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                // Block collections are marked where the parser noticed them, which can be
                // after their first key; the first child is where a reader looks.
                Some(Frame::Seq(pos, items)) => Node {
                    pos: items.first().map_or(pos, |item| item.pos),
                    value: Value::Seq(items),
                },
                Some(Frame::Map(pos, entries, _)) => Node {
                    pos: entries.first().map_or(pos, |(key, _)| key.pos),
                    value: Value::Map(entries),
                },
                None => {
                    return Err(SyntaxError {
                        pos,
                        message: "YAML syntax: unbalanced end of collection".into(),
                        hint: None,
                    });
                }
            },
        };
        match stack.last_mut() {
            None => {
                if root.is_none() {
                    root = Some(complete);
                }
            }
            Some(Frame::Seq(_, items)) => items.push(complete),
            Some(Frame::Map(_, entries, pending_key)) => match pending_key.take() {
                None => {
                    if !matches!(complete.value, Value::Scalar(_) | Value::Null) {
                        return Err(SyntaxError {
                            pos: complete.pos,
                            message: format!("mapping key is {}", complete.kind_name()),
                            hint: Some("keys must be plain names such as `segment:`".into()),
                        });
                    }
                    if let Value::Scalar(new_key) = &complete.value
                        && let Some((first, _)) = entries
                            .iter()
                            .find(|(key, _)| matches!(&key.value, Value::Scalar(k) if k == new_key))
                    {
                        return Err(SyntaxError {
                            pos: complete.pos,
                            message: format!("duplicate key '{new_key}'"),
                            hint: Some(format!(
                                "'{new_key}' is already set on line {}",
                                first.pos.line
                            )),
                        });
                    }
                    *pending_key = Some(complete);
                }
                Some(key) => {
                    // An empty value is marked at the next token, often on the next line;
                    // its key is the useful place to point at.
                    let mut value = complete;
                    if value.value == Value::Null {
                        value.pos = key.pos;
                    }
                    entries.push((key, value));
                }
            },
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let node = parse("segment: pacs\nmembers: [10.0.0.0/8, \"fd00::/8\"]\n")
            .unwrap()
            .unwrap();
        let Value::Map(entries) = node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(
            entries[0].1.pos,
            Pos {
                line: 1,
                column: 10
            }
        );
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("not a seq")
        };
        assert_eq!(
            items[0].pos,
            Pos {
                line: 2,
                column: 11
            }
        );
        assert_eq!(
            items[1].pos,
            Pos {
                line: 2,
                column: 23
            }
        );
    }

    #[test]
    fn rejects_duplicate_keys_and_aliases() {
        assert!(parse("a: 1\na: 2\n").is_err());
        assert!(parse("a: &x 1\nb: *x\n").is_err());
        assert!(parse(&"[".repeat(100)).is_err());
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }
}
