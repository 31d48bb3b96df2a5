//! The daemon's `/metrics` (Prometheus text format 0.0.4), parsed into samples that tests can
//! select by labels.

use std::{collections::BTreeMap, fmt};

/// One sample line: `name{label="value",…} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every pair of `labels` is among this sample's labels.
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|have| have == v))
    }
}

/// A parsed `/metrics` answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format; comments and blank lines are skipped. The error names the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).map_err(|e| format!("{e} in line {line:?}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { samples })
    }

    /// Samples of metric `name` that carry all of `labels`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has(labels))
    }

    /// The sum over [`Metrics::select`]; 0 when no sample matches (as for a counter never
    /// incremented that the daemon does not show).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.select(name, labels).map(|s| s.value).sum()
    }

    /// The value of the one sample of `name` with `labels`; `None` when none or several match.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.select(name, labels);
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }
}

impl fmt::Display for Metrics {
    /// The samples back in text form, for assertion messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.samples {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            writeln!(f, "{}{{{}}} {}", s.name, labels.join(","), s.value)?;
        }
        Ok(())
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"").ok_or("bad label")?;
            let (value, after) = unescape_value(after)?;
            labels.insert(key.trim().to_owned(), value);
            rest = after;
        }
    }
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// A label value up to its closing quote, and what follows the quote.
fn unescape_value(s: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, other)) => value.push(other),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_selects() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE x counter\n\
             x{a=\"1\",b=\"q\\\"\\\\\"} 3\nx{a=\"2\",b=\"\"} 4\ny 0.5\nz{} 7 1700000000\n",
        )
        .unwrap();
        assert_eq!(m.sum("x", &[]), 7.0);
        assert_eq!(m.get("x", &[("a", "1")]), Some(3.0));
        assert_eq!(m.get("x", &[("b", "q\"\\")]), Some(3.0));
        assert_eq!(m.get("x", &[]), None);
        assert_eq!(m.get("y", &[]), Some(0.5));
        assert_eq!(m.get("z", &[]), Some(7.0));
        assert!(Metrics::parse("x{a=\"1} 3").is_err());
    }
}
