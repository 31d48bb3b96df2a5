//! The daemon's HTTP endpoints: `/metrics` (Prometheus), `/healthz`, `/readyz`, and `/flows`,
//! the live flow stream as NDJSON that `enforcer observe` reads.
use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Frame, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{daemon::SharedState, events::FlowEvent, metrics};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The content type of `/flows`.
pub const NDJSON: &str = "application/x-ndjson";

/// A slow client must not hold a connection open forever before sending its request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines buffered per `/flows` client before backpressure reaches its broadcast receiver
/// (which then lags and counts the loss instead of blocking the publisher).
const FLOW_CHANNEL: usize = 64;

/// Binds `addr` and serves until the returned future is dropped (or its task aborted).
pub async fn serve(addr: SocketAddr, state: Arc<SharedState>) -> Result<(), HttpError> {
    let (listener, _) = bind(addr).await?;
    serve_on(listener, state).await;
    Ok(())
}

/// Binds `addr` and returns the listener with the address actually bound (port 0 picks one).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), HttpError> {
    let bind_error = |source| HttpError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// Serves connections from `listener` forever. Dropping the future closes every connection
/// too: they live in a [`JoinSet`] owned by it.
pub async fn serve_on(listener: TcpListener, state: Arc<SharedState>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = state.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| handle(request, state.clone()));
                        let result = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        if let Err(error) = result {
                            debug!(%peer, %error, "HTTP connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Usually out of file descriptors: wait rather than spin.
                    warn!(%error, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

type ResponseBody = BoxBody<Bytes, Infallible>;

async fn handle(
    request: Request<Incoming>,
    state: Arc<SharedState>,
) -> Result<Response<ResponseBody>, Infallible> {
    if request.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return Ok(response);
    }
    let response = match request.uri().path() {
        "/metrics" => metrics_response(state).await,
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/flows" => match FlowQuery::parse(request.uri().query()) {
            Ok(query) => flows_response(state, query),
            Err(message) => text(StatusCode::BAD_REQUEST, format!("{message}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; endpoints: /metrics /healthz /readyz /flows\n",
        ),
    };
    Ok(response)
}

async fn metrics_response(state: Arc<SharedState>) -> Response<ResponseBody> {
    // Reading the snapshot walks BPF maps with syscalls: keep it off the async workers.
    match tokio::task::spawn_blocking(move || (state.metrics)().render()).await {
        Ok(body) => with_type(StatusCode::OK, metrics::CONTENT_TYPE, full(body)),
        Err(error) => {
            warn!(%error, "reading the metrics failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reading the metrics failed\n",
            )
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    with_type(status, "text/plain; charset=utf-8", full(body))
}

fn full(body: impl Into<Bytes>) -> ResponseBody {
    Full::new(body.into()).boxed()
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: ResponseBody,
) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The filters of `/flows`.
#[derive(Debug, Default, PartialEq)]
struct FlowQuery {
    verdict: Option<String>,
    from: Option<String>,
    to: Option<String>,
    since: Option<Duration>,
    follow: bool,
}

impl FlowQuery {
    fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut parsed = FlowQuery {
            follow: true,
            ..Default::default()
        };
        let mut seen = HashSet::new();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if !seen.insert(key.clone()) {
                return Err(format!("parameter {key:?} given more than once"));
            }
            match &*key {
                "verdict" => match &*value {
                    "allow" | "deny" | "audit" => parsed.verdict = Some(value.into_owned()),
                    other => {
                        return Err(format!(
                            "bad verdict {other:?}: expected allow, deny or audit"
                        ));
                    }
                },
                "from" | "to" => {
                    if value.is_empty() {
                        return Err(format!("{key}: empty segment name"));
                    }
                    let segment = Some(value.into_owned());
                    if key == "from" {
                        parsed.from = segment;
                    } else {
                        parsed.to = segment;
                    }
                }
                "since" => {
                    let since = humantime::parse_duration(&value).map_err(|error| {
                        format!("bad since {value:?}: {error} (expected a duration like 30s or 5m)")
                    })?;
                    parsed.since = Some(since);
                }
                "follow" => match &*value {
                    "true" => parsed.follow = true,
                    "false" => parsed.follow = false,
                    other => return Err(format!("bad follow {other:?}: expected true or false")),
                },
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: expected verdict, from, to, since or follow"
                    ));
                }
            }
        }
        Ok(parsed)
    }

    fn matches(&self, event: &FlowEvent) -> bool {
        let wanted =
            |filter: &Option<String>, value: &str| filter.as_deref().is_none_or(|f| f == value);
        wanted(&self.verdict, &event.verdict)
            && wanted(&self.from, &event.src_segment)
            && wanted(&self.to, &event.dst_segment)
    }
}

fn flows_response(state: Arc<SharedState>, query: FlowQuery) -> Response<ResponseBody> {
    // Subscribe before reading the kept events so that nothing published in between is missed.
    let live = query.follow.then(|| state.hub.subscribe());
    let recent = match query.since {
        Some(since) => {
            let since = SystemTime::now()
                .checked_sub(since)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            state.hub.recent(Some(since))
        }
        // Without `since`, a finite request returns all kept events; a live one none.
        None if !query.follow => state.hub.recent(None),
        None => Vec::new(),
    };
    let (sender, receiver) = mpsc::channel(FLOW_CHANNEL);
    tokio::spawn(stream_flows(state, query, recent, live, sender));
    with_type(StatusCode::OK, NDJSON, ChannelBody(receiver).boxed())
}

/// Sends the matching kept events, then live ones, until the client goes away.
async fn stream_flows(
    state: Arc<SharedState>,
    query: FlowQuery,
    recent: Vec<Arc<FlowEvent>>,
    live: Option<broadcast::Receiver<Arc<FlowEvent>>>,
    sender: mpsc::Sender<Bytes>,
) {
    for event in recent.iter().filter(|event| query.matches(event)) {
        if sender.send(json_line(event)).await.is_err() {
            return;
        }
    }
    let Some(mut live) = live else {
        return;
    };
    // Events published between `subscribe` and `recent` arrive live too; they come first, in
    // order, so skip them by identity until the first new one. `recent` keeps them alive, so
    // their addresses cannot be reused meanwhile.
    let mut already_sent: HashSet<usize> = recent.iter().map(address).collect();
    let mut recent = Some(recent);
    loop {
        let event = tokio::select! {
            // The client is gone: hyper dropped the body.
            () = sender.closed() => return,
            received = live.recv() => match received {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    state.hub.record_lag(missed);
                    debug!(missed, "a /flows client fell behind");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if recent.is_some() {
            if already_sent.contains(&address(&event)) {
                continue;
            }
            already_sent = HashSet::new();
            recent = None;
        }
        if query.matches(&event) && sender.send(json_line(&event)).await.is_err() {
            return;
        }
    }
}

/// Identity of a shared event (a plain number, so the task stays `Send`).
fn address(event: &Arc<FlowEvent>) -> usize {
    Arc::as_ptr(event) as usize
}

fn json_line(event: &FlowEvent) -> Bytes {
    let mut line = Vec::with_capacity(320);
    event.write_json_line(&mut line);
    line.into()
}

/// A response body fed by a channel: each message is one chunk, written as it comes.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flow_queries() {
        assert_eq!(
            FlowQuery::parse(None).unwrap(),
            FlowQuery {
                follow: true,
                ..Default::default()
            }
        );
        let query = FlowQuery::parse(Some(
            "verdict=deny&from=radiology&to=icu%20beds&since=5m&follow=false",
        ))
        .unwrap();
        assert_eq!(
            query,
            FlowQuery {
                verdict: Some("deny".into()),
                from: Some("radiology".into()),
                to: Some("icu beds".into()),
                since: Some(Duration::from_secs(300)),
                follow: false,
            }
        );
    }

    #[test]
    fn rejects_bad_flow_queries() {
        for (query, expected) in [
            ("verdict=drop", "bad verdict"),
            ("since=yesterday", "bad since"),
            ("follow=maybe", "bad follow"),
            ("colour=red", "unknown parameter"),
            ("from=", "empty segment"),
            ("to=a&to=b", "more than once"),
        ] {
            let error = FlowQuery::parse(Some(query)).unwrap_err();
            assert!(error.contains(expected), "{query}: {error}");
        }
    }
}
