//! `enforcer observe`: reads a daemon's `/flows` stream and prints one flow per line, like
//! `hubble observe`, or the raw JSON lines with `--output json`.
use std::{net::IpAddr, time::Duration};

use bytes::{Buf as _, BytesMut};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, StatusCode, Uri, body::Bytes, header};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::debug;

use crate::events::FlowEvent;

/// Where `enforcer run` serves by default (`--metrics-addr 0.0.0.0:9477`), seen locally.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:9477";
const DEFAULT_PORT: u16 = 9477;
/// An error answer longer than this is cut: it is only shown to a person.
const MAX_ERROR_BODY: usize = 4096;

/// Options of `enforcer observe`.
#[derive(Clone, Debug)]
pub struct ObserveOptions {
    /// `--addr http://HOST:PORT` of `enforcer run --metrics-addr`.
    pub addr: String,
    /// `--verdict allow|deny|audit`.
    pub verdict: Option<String>,
    /// `--from SEGMENT`: source segment.
    pub from: Option<String>,
    /// `--to SEGMENT`: destination segment.
    pub to: Option<String>,
    /// `--since DURATION` (`30s`, `5m`, `1h`): first the kept events of that period.
    pub since: Option<String>,
    /// `--output json`: the raw JSON lines.
    pub output_json: bool,
    /// Keep printing live events; `false` stops after the kept ones.
    pub follow: bool,
}

impl Default for ObserveOptions {
    fn default() -> Self {
        ObserveOptions {
            addr: DEFAULT_ADDR.to_string(),
            verdict: None,
            from: None,
            to: None,
            since: None,
            output_json: false,
            follow: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("bad --addr {addr:?}: {reason} (expected http://HOST:PORT)")]
    BadAddr { addr: String, reason: String },
    #[error("bad --verdict {0:?}: expected allow, deny or audit")]
    BadVerdict(String),
    #[error("bad --since {value:?}: {source} (expected a duration like 30s, 5m or 1h)")]
    BadSince {
        value: String,
        source: humantime::DurationError,
    },
    #[error(
        "cannot connect to the enforcer at {addr}: {source}; is `enforcer run` running there? \
         Give its --metrics-addr with --addr http://HOST:PORT"
    )]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP error talking to the enforcer at {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("the enforcer at {addr} answered {status}: {message}")]
    Status {
        addr: String,
        status: StatusCode,
        message: String,
    },
    #[error("the enforcer sent a line that is not a flow event ({source}): {line}")]
    Decode {
        line: String,
        source: serde_json::Error,
    },
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

/// Prints the flows that match `options` to `out` until the server ends the stream (with
/// `follow` false) or the future is dropped. Each line is flushed as it is written.
pub async fn run<W: AsyncWrite + Unpin>(
    options: ObserveOptions,
    mut out: W,
) -> Result<(), ObserveError> {
    let target = Target::parse(&options.addr)?;
    let path = flows_path(&options)?;

    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| ObserveError::Connect {
            addr: options.addr.clone(),
            source,
        })?;
    let http_error = |source| ObserveError::Http {
        addr: options.addr.clone(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    // The connection ends by itself once the request and its response body are dropped.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, "the /flows connection ended with an error");
        }
    });

    let request = Request::get(path)
        .header(header::HOST, target.authority.as_str())
        .header(header::ACCEPT, crate::http::NDJSON)
        .body(Empty::<Bytes>::new())
        .map_err(|error| ObserveError::BadAddr {
            addr: options.addr.clone(),
            reason: error.to_string(),
        })?;
    let response = sender.send_request(request).await.map_err(http_error)?;
    let status = response.status();
    let mut body = response.into_body();

    if status != StatusCode::OK {
        let mut message = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(http_error)?.into_data() {
                message.extend_from_slice(&data);
            }
            if message.len() > MAX_ERROR_BODY {
                message.truncate(MAX_ERROR_BODY);
                break;
            }
        }
        return Err(ObserveError::Status {
            addr: options.addr.clone(),
            status,
            message: String::from_utf8_lossy(&message).trim().to_string(),
        });
    }

    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(http_error)?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line = pending.split_to(end + 1);
            print_line(&line[..end], options.output_json, &mut out).await?;
        }
    }
    // The server ends every line with a newline; a cut-off stream may not.
    if pending.has_remaining() {
        print_line(&pending, options.output_json, &mut out).await?;
    }
    Ok(())
}

async fn print_line<W: AsyncWrite + Unpin>(
    line: &[u8],
    output_json: bool,
    out: &mut W,
) -> Result<(), ObserveError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let mut text = if output_json {
        line.to_vec()
    } else {
        let event: FlowEvent =
            serde_json::from_slice(line).map_err(|source| ObserveError::Decode {
                line: String::from_utf8_lossy(line).into_owned(),
                source,
            })?;
        format_flow(&event).into_bytes()
    };
    text.push(b'\n');
    out.write_all(&text).await.map_err(ObserveError::Output)?;
    out.flush().await.map_err(ObserveError::Output)
}

/// The host and port of `--addr`.
struct Target {
    host: String,
    port: u16,
    authority: String,
}

impl Target {
    fn parse(addr: &str) -> Result<Self, ObserveError> {
        let bad = |reason: &str| ObserveError::BadAddr {
            addr: addr.to_string(),
            reason: reason.to_string(),
        };
        // A bare HOST:PORT is accepted too: it is what `--metrics-addr` takes.
        let full = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let uri: Uri = full.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            _ => return Err(bad("only http:// is supported")),
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
        // `Uri` keeps the brackets of an IPv6 host; connecting needs the bare address.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let authority = match bare.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{bare}]:{port}"),
            _ => format!("{bare}:{port}"),
        };
        Ok(Target {
            host: bare.to_string(),
            port,
            authority,
        })
    }
}

/// `/flows?...` for `options`, after checking the filters locally for clearer errors.
fn flows_path(options: &ObserveOptions) -> Result<String, ObserveError> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(verdict) = &options.verdict {
        if !matches!(verdict.as_str(), "allow" | "deny" | "audit") {
            return Err(ObserveError::BadVerdict(verdict.clone()));
        }
        query.append_pair("verdict", verdict);
    }
    if let Some(from) = &options.from {
        query.append_pair("from", from);
    }
    if let Some(to) = &options.to {
        query.append_pair("to", to);
    }
    if let Some(since) = &options.since {
        let duration: Duration =
            humantime::parse_duration(since).map_err(|source| ObserveError::BadSince {
                value: since.clone(),
                source,
            })?;
        // Normalized, so the server parses exactly what was checked here.
        query.append_pair("since", &humantime::format_duration(duration).to_string());
    }
    if !options.follow {
        query.append_pair("follow", "false");
    }
    let query = query.finish();
    Ok(if query.is_empty() {
        "/flows".to_string()
    } else {
        format!("/flows?{query}")
    })
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// One flow as a line, e.g.
/// `Nov 23 04:31:07.123  10.10.0.20:40000 (radiology) -> 10.60.0.10:5432 (billing)  tcp  DENIED  policy_denied  rule=-  eth0 ingress`.
/// Times are UTC, like the JSON.
pub fn format_flow(event: &FlowEvent) -> String {
    let endpoint = |ip: IpAddr, port: Option<u16>| match (ip, port) {
        (IpAddr::V6(ip), Some(port)) => format!("[{ip}]:{port}"),
        (ip, Some(port)) => format!("{ip}:{port}"),
        (ip, None) => ip.to_string(),
    };
    let proto = match event.icmp_type {
        Some(icmp_type) => format!("{} type={icmp_type}", event.proto),
        None => event.proto.clone(),
    };
    let verdict = match event.verdict.as_str() {
        "allow" => "ALLOWED".to_string(),
        "deny" => "DENIED".to_string(),
        other => other.to_uppercase(),
    };
    format!(
        "{}  {} ({}) -> {} ({})  {}  {}  {}  rule={}  {} {}",
        short_time(&event.time),
        endpoint(event.src, event.sport),
        event.src_segment,
        endpoint(event.dst, event.dport),
        event.dst_segment,
        proto,
        verdict,
        event.reason,
        event.rule.as_deref().unwrap_or("-"),
        event.iface,
        event.direction,
    )
}

/// `Nov 23 04:31:07.123` from an RFC 3339 time (the time as given if it is not one).
fn short_time(time: &str) -> String {
    let Ok(parsed) = humantime::parse_rfc3339_weak(time) else {
        return time.to_string();
    };
    // Normalized to `YYYY-MM-DDTHH:MM:SS.mmmZ`, whatever offset or precision came in.
    let utc = humantime::format_rfc3339_millis(parsed).to_string();
    let month = utc
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)));
    match (month, utc.get(8..10), utc.get(11..23)) {
        (Some(month), Some(day), Some(clock)) => format!("{month} {day} {clock}"),
        _ => time.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn event() -> FlowEvent {
        FlowEvent {
            time: "2024-11-23T04:31:07.123Z".into(),
            iface: "eth0".into(),
            direction: "ingress".into(),
            src: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 20)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 60, 0, 10)),
            sport: Some(40000),
            dport: Some(5432),
            proto: "tcp".into(),
            icmp_type: None,
            src_segment: "radiology".into(),
            dst_segment: "billing".into(),
            verdict: "deny".into(),
            reason: "policy_denied".into(),
            rule: None,
            revision: "abc".into(),
        }
    }

    #[test]
    fn formats_a_flow_like_hubble() {
        assert_eq!(
            format_flow(&event()),
            "Nov 23 04:31:07.123  10.10.0.20:40000 (radiology) -> 10.60.0.10:5432 (billing)  \
             tcp  DENIED  policy_denied  rule=-  eth0 ingress"
        );
        let icmp6 = FlowEvent {
            src: IpAddr::V6(Ipv6Addr::LOCALHOST),
            dst: IpAddr::V6(Ipv6Addr::LOCALHOST),
            sport: None,
            dport: None,
            proto: "icmpv6".into(),
            icmp_type: Some(128),
            verdict: "allow".into(),
            reason: "allowed".into(),
            rule: Some("pacs-to-ris".into()),
            ..event()
        };
        assert_eq!(
            format_flow(&icmp6),
            "Nov 23 04:31:07.123  ::1 (radiology) -> ::1 (billing)  icmpv6 type=128  ALLOWED  \
             allowed  rule=pacs-to-ris  eth0 ingress"
        );
    }

    #[test]
    fn parses_addresses() {
        let target = Target::parse("http://[::1]:9000").unwrap();
        assert_eq!((target.host.as_str(), target.port), ("::1", 9000));
        assert_eq!(target.authority, "[::1]:9000");
        let target = Target::parse("10.0.0.1").unwrap();
        assert_eq!((target.host.as_str(), target.port), ("10.0.0.1", 9477));
        assert!(matches!(
            Target::parse("https://x:1"),
            Err(ObserveError::BadAddr { .. })
        ));
    }

    #[test]
    fn checks_filters_locally() {
        let options = |verdict: Option<&str>, since: Option<&str>| ObserveOptions {
            verdict: verdict.map(String::from),
            since: since.map(String::from),
            ..Default::default()
        };
        assert!(matches!(
            flows_path(&options(Some("drop"), None)),
            Err(ObserveError::BadVerdict(_))
        ));
        assert!(matches!(
            flows_path(&options(None, Some("a while"))),
            Err(ObserveError::BadSince { .. })
        ));
        let path = flows_path(&ObserveOptions {
            from: Some("icu beds".into()),
            follow: false,
            ..options(Some("deny"), Some("90s"))
        })
        .unwrap();
        assert_eq!(
            path,
            "/flows?verdict=deny&from=icu+beds&since=1m+30s&follow=false"
        );
    }
}
