//! The HTTP front: parses the task out of each request, sets llama-server's per-request `lora`
//! list, forwards, and streams the answer back as it comes (SSE included).
//!
//! The hot path takes no lock: each request holds the generation (routing table + llama-server)
//! that was current when it arrived, read from an `ArcSwap`; the upstream connection pool is
//! hyper's. `POST /admin/reload` (loopback peers only) asks the supervisor for a live reload.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::log;
use crate::rewrite::ModelRewrite;
use crate::routes::Route;
use crate::supervisor::{Current, Generation, InFlight, ReloadReply};

pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled keep-alive client for llama-server.
pub fn upstream_client() -> UpstreamClient {
    let mut connector = HttpConnector::new();
    // Small requests and SSE events: Nagle would add tens of milliseconds.
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        // Below llama-server's (cpp-httplib's) 5 s keep-alive, so we do not reuse a socket
        // the server is about to close.
        .pool_idle_timeout(Duration::from_secs(3))
        .pool_timer(TokioTimer::new())
        .build(connector)
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// To receive a whole request body.
    pub body_timeout: Duration,
    /// To receive a request head (also bounds idle keep-alive connections that start one).
    pub header_timeout: Duration,
    /// For llama-server's response head.
    pub upstream_timeout: Duration,
}

pub struct Proxy {
    current: Arc<Current>,
    client: UpstreamClient,
    limits: Limits,
    mode: &'static str,
    reloads: tokio::sync::mpsc::Sender<ReloadReply>,
}

/// Which request field names the task.
#[derive(Clone, Copy)]
enum TaskField {
    /// OpenAI-compatible endpoints: `model`, kept in the body; llama-server answers with its
    /// own model file there, which the answer gets replaced by the task ([`ModelRewrite`]).
    Model,
    /// llama-server's native `/completion`: `task`, removed before forwarding.
    Task,
}

impl TaskField {
    fn name(self) -> &'static str {
        match self {
            TaskField::Model => "model",
            TaskField::Task => "task",
        }
    }
}

/// An error answered by the plugin itself, in the OpenAI error shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    task: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), task: None }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::CONFLICT => "reload_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => "upstream_error",
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST | StatusCode::REQUEST_TIMEOUT => "invalid_request_error",
            _ => "server_error",
        }
    }

    fn into_response(self) -> Response<ProxyBody> {
        let mut error = json!({"code": self.status.as_u16(), "type": self.kind(), "message": self.message});
        if let Some(task) = self.task {
            error["task"] = json!(task);
        }
        json_response(self.status, Bytes::from(json!({"error": error}).to_string()))
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Endpoints forwarded as they are: they read the model, never run adapters, and change no
/// server state (unlike `POST /lora-adapters` or `POST /props`, which stay unreachable).
const PASSTHROUGH_POST: [&str; 3] = ["/tokenize", "/detokenize", "/apply-template"];

impl Proxy {
    pub fn new(
        current: Arc<Current>,
        client: UpstreamClient,
        limits: Limits,
        mode: &'static str,
        reloads: tokio::sync::mpsc::Sender<ReloadReply>,
    ) -> Self {
        Proxy { current, client, limits, mode, reloads }
    }

    /// Answers one request; every outcome, errors included, is logged once when its body ends.
    /// The request keeps its generation's llama-server alive until then.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let hold = self.current.enter();
        let mut entry = RequestLog {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            start: Some(start),
            generation: hold.generation().serial,
            ..Default::default()
        };
        let mut resp = match self.dispatch(req, hold.generation(), peer, &mut entry).await {
            Ok(resp) => resp,
            Err(e) => {
                entry.error = Some(e.message.clone());
                e.into_response()
            }
        };
        entry.status = resp.status().as_u16();
        entry.head_ms = start.elapsed().as_secs_f64() * 1e3;
        let body = resp.body_mut();
        body.log = Some(entry);
        body.hold = Some(hold);
        Ok(resp)
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        gen: &Generation,
        peer: SocketAddr,
        entry: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, ApiError> {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/health") => Ok(self.health(gen).await),
            (&Method::GET, "/v1/models" | "/models") => Ok(json_response(StatusCode::OK, gen.table.models_body())),
            (&Method::POST, "/v1/completions" | "/v1/chat/completions") => self.route_and_forward(req, gen, TaskField::Model, entry).await,
            (&Method::POST, "/completion") => self.route_and_forward(req, gen, TaskField::Task, entry).await,
            (&Method::POST, p) if PASSTHROUGH_POST.contains(&p) => self.forward_unchanged(req, gen).await,
            (&Method::GET, "/props") => self.forward_unchanged(req, gen).await,
            (&Method::POST, "/admin/reload") => self.reload(peer).await,
            (_, "/health" | "/v1/models" | "/models" | "/v1/completions" | "/v1/chat/completions" | "/completion" | "/props" | "/admin/reload") => {
                Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {path}", req.method())))
            }
            (_, p) if PASSTHROUGH_POST.contains(&p) => {
                Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {path}", req.method())))
            }
            _ => Err(ApiError::new(StatusCode::NOT_FOUND, format!("d2c-serve has no endpoint {} {path}", req.method()))),
        }
    }

    /// Waits for the supervisor's reload and answers with the new generation, or 409 with why
    /// the current one stays.
    async fn reload(&self, peer: SocketAddr) -> Result<Response<ProxyBody>, ApiError> {
        if !admin_allowed(peer) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, format!("/admin/reload is accepted from loopback only, not from {}", peer.ip())));
        }
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let gone = || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "d2c-serve is shutting down");
        self.reloads.send(reply).await.map_err(|_| gone())?;
        match outcome.await.map_err(|_| gone())? {
            Ok(summary) => Ok(json_response(StatusCode::OK, Bytes::from(json!({"status": "reloaded", "reload": summary}).to_string()))),
            Err(why) => Err(ApiError::new(StatusCode::CONFLICT, format!("reload refused, the previous manifest is still served: {why}"))),
        }
    }

    async fn route_and_forward(
        &self,
        req: Request<Incoming>,
        gen: &Generation,
        field: TaskField,
        entry: &mut RequestLog,
    ) -> Result<Response<ProxyBody>, ApiError> {
        let (parts, body) = req.into_parts();
        let body = self.read_body(&parts.headers, body).await?;
        let mut json: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")))?;
        let Some(object) = json.as_object_mut() else {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "the JSON body must be an object"));
        };
        let named = match field {
            TaskField::Model => object.get("model").cloned(),
            TaskField::Task => object.remove("task"),
        };
        let task = match &named {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("`{}` must be a string naming a task, got {other}", field.name())))
            }
        };
        let table = &gen.table;
        let route = table.route(task).map_err(|unknown| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("unknown task {unknown:?}: GET /v1/models lists the tasks of this manifest"),
            task: Some(unknown.to_owned()),
        })?;
        entry.task = task.filter(|t| !t.is_empty()).map(str::to_owned);
        entry.adapter = table.adapter(route).map(|a| a.file.clone());
        match table.lora_field(route) {
            // The plugin owns adapter choice: a client's own `lora` is replaced.
            Some(lora) => {
                object.insert("lora".into(), lora.clone());
            }
            None => {
                object.remove("lora");
            }
        }
        let body = serde_json::to_vec(&json).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut resp = self.forward(parts, gen, Bytes::from(body)).await?;
        if let (TaskField::Model, Some(task)) = (field, &entry.task) {
            let content_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            if let Some(rewrite) = ModelRewrite::for_content_type(content_type, task) {
                resp.headers_mut().remove(header::CONTENT_LENGTH);
                resp.body_mut().rewrite = Some(rewrite);
            }
        }
        if let Some(task) = &entry.task {
            if let Ok(v) = HeaderValue::from_str(task) {
                resp.headers_mut().insert(HeaderName::from_static("x-d2c-task"), v);
            }
        }
        let adapter_header = match route {
            Route::Base => HeaderValue::from_static("none"),
            Route::Task(_) => entry.adapter.as_deref().and_then(|a| HeaderValue::from_str(a).ok()).unwrap_or(HeaderValue::from_static("?")),
        };
        resp.headers_mut().insert(HeaderName::from_static("x-d2c-adapter"), adapter_header);
        if let Some(scale) = table.scale(route) {
            if let Ok(v) = HeaderValue::from_str(&scale.to_string()) {
                resp.headers_mut().insert(HeaderName::from_static("x-d2c-scale"), v);
            }
        }
        Ok(resp)
    }

    async fn forward_unchanged(&self, req: Request<Incoming>, gen: &Generation) -> Result<Response<ProxyBody>, ApiError> {
        let (parts, body) = req.into_parts();
        let body = self.read_body(&parts.headers, body).await?;
        self.forward(parts, gen, body).await
    }

    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
        let max = self.limits.max_body_bytes;
        let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {max} bytes (--max-body-bytes)"));
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        match tokio::time::timeout(self.limits.body_timeout, Limited::new(body, max).collect()).await {
            Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, format!("request body not received within {:?}", self.limits.body_timeout))),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read request body: {e}"))),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    async fn forward(&self, parts: hyper::http::request::Parts, gen: &Generation, body: Bytes) -> Result<Response<ProxyBody>, ApiError> {
        let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = gen.upstream.uri(path_and_query).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad request target: {e}")))?;
        let request = || {
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri.clone();
            let headers = req.headers_mut();
            for (name, value) in &parts.headers {
                if !is_hop_by_hop(name) && name != header::HOST && name != header::CONTENT_LENGTH {
                    headers.append(name.clone(), value.clone());
                }
            }
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            req
        };
        let deadline = tokio::time::Instant::now() + self.limits.upstream_timeout;
        let timed_out = || {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("llama-server gave no answer within {:?} (--request-timeout)", self.limits.upstream_timeout),
            )
        };
        let resp = match tokio::time::timeout_at(deadline, self.client.request(request())).await {
            Err(_) => return Err(timed_out()),
            // A pooled keep-alive socket that llama-server closed as the request went out (hyper
            // only retries on its own when the close came before the write). The endpoints the
            // plugin forwards change nothing upstream but the compute they cost, so sending the
            // request once more is safe; a refused connect is not retried.
            Ok(Err(e)) if !e.is_connect() => {
                log::event("upstream_retry", json!({"upstream": gen.upstream.url(), "error": error_chain(e)}));
                match tokio::time::timeout_at(deadline, self.client.request(request())).await {
                    Err(_) => return Err(timed_out()),
                    Ok(result) => result,
                }
            }
            Ok(result) => result,
        };
        let resp = resp.map_err(|e| {
            ApiError::new(StatusCode::BAD_GATEWAY, format!("llama-server at {} is unreachable: {}", gen.upstream.url(), error_chain(e)))
        })?;
        let (mut parts, body) = resp.into_parts();
        let hop: Vec<HeaderName> = parts.headers.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
        for name in hop {
            parts.headers.remove(name);
        }
        Ok(Response::from_parts(parts, ProxyBody::upstream(body)))
    }

    async fn health(&self, gen: &Generation) -> Response<ProxyBody> {
        let uri = gen.upstream.uri("/health");
        let probe = async {
            let req = Request::get(uri.ok()?).body(Full::new(Bytes::new())).ok()?;
            let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await.ok()?.ok()?;
            Some(resp.status())
        };
        let upstream_status = probe.await;
        let (state, healthy) = match upstream_status {
            Some(StatusCode::OK) => ("ok", true),
            Some(StatusCode::SERVICE_UNAVAILABLE) => ("loading", false),
            Some(_) => ("error", false),
            None => ("down", false),
        };
        let body = json!({
            "status": if healthy { "ok" } else { "degraded" },
            "plugin": {
                "status": "ok",
                "mode": self.mode,
                "manifest": gen.table.manifest().display().to_string(),
                "generation": gen.serial,
                "tasks": gen.table.task_count(),
                "adapters": gen.table.adapters().len(),
            },
            "upstream": {
                "status": state,
                "url": gen.upstream.url(),
                "http_status": upstream_status.map(|s| s.as_u16()),
            },
        });
        let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json_response(status, Bytes::from(body.to_string()))
    }
}

/// Reloading changes what every client gets: only a process on this machine may ask.
fn admin_allowed(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        // An IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d.
        std::net::IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Accepts connections until the listener fails; at most `max_connections` served at once.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, max_connections: usize) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        // Backpressure: when every slot is busy, stop accepting and let the kernel queue clients.
        let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_transient_accept_error(&e) => {
                log::event("accept_error", json!({"error": e.to_string()}));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let header_timeout = proxy.limits.header_timeout;
        tokio::spawn(async move {
            let service = service_fn(move |req| proxy.clone().handle(req, peer));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            // A client that goes away mid-request is its own business; the request log has it.
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // EMFILE/ENFILE (out of descriptors) show up as `Other`/uncategorised: wait, don't die.
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut | Other)
        || e.raw_os_error().is_some_and(|c| c == libc::EMFILE || c == libc::ENFILE || c == libc::ENOBUFS || c == libc::ENOMEM)
}

/// What the per-request log line says; written when the response body ends or is dropped, so
/// a streamed answer is logged with its full duration.
#[derive(Debug, Default)]
struct RequestLog {
    method: Method,
    path: String,
    task: Option<String>,
    adapter: Option<String>,
    generation: u64,
    status: u16,
    start: Option<Instant>,
    head_ms: f64,
    error: Option<String>,
}

impl RequestLog {
    fn emit(&self, bytes: u64, completed: bool) {
        let total_ms = self.start.map(|s| s.elapsed().as_secs_f64() * 1e3).unwrap_or(0.0);
        log::event(
            "request",
            json!({
                "method": self.method.as_str(),
                "path": self.path,
                "task": self.task,
                "adapter": self.adapter,
                "generation": self.generation,
                "status": self.status,
                "latency_ms": round3(self.head_ms),
                "total_ms": round3(total_ms),
                "bytes": bytes,
                "completed": completed,
                "error": self.error,
            }),
        );
    }
}

fn round3(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

enum Inner {
    Local(Full<Bytes>),
    Upstream(Incoming),
}

/// Response body: the plugin's own JSON, or llama-server's body passed through frame by frame
/// (never collected, so SSE events reach the client as llama-server emits them).
pub struct ProxyBody {
    inner: Inner,
    log: Option<RequestLog>,
    /// Dropped after the log line: the generation is released once the response has ended.
    hold: Option<InFlight>,
    /// The task as `model` in OpenAI answers; what it still holds is sent when upstream ends.
    rewrite: Option<ModelRewrite>,
    bytes: u64,
    completed: bool,
}

impl ProxyBody {
    fn local(body: Bytes) -> Self {
        ProxyBody { inner: Inner::Local(Full::new(body)), log: None, hold: None, rewrite: None, bytes: 0, completed: false }
    }

    fn upstream(body: Incoming) -> Self {
        ProxyBody { inner: Inner::Upstream(body), log: None, hold: None, rewrite: None, bytes: 0, completed: false }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            let polled = match &mut this.inner {
                Inner::Local(body) => Pin::new(body).poll_frame(cx).map_err(|never| match never {}),
                Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            };
            let polled = match (polled, &mut this.rewrite) {
                (Poll::Ready(Some(Ok(frame))), Some(rewrite)) => match frame.into_data() {
                    // Only whole events (or, for JSON, the whole body) go out: poll on until some.
                    Ok(data) => match rewrite.push(&data) {
                        out if out.is_empty() => continue,
                        out => Poll::Ready(Some(Ok(Frame::data(out)))),
                    },
                    Err(trailers) => Poll::Ready(Some(Ok(trailers))),
                },
                (Poll::Ready(None), Some(rewrite)) if rewrite.has_pending() => Poll::Ready(Some(Ok(Frame::data(rewrite.finish())))),
                (polled, _) => polled,
            };
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        this.bytes += data.len() as u64;
                    }
                }
                Poll::Ready(None) => this.completed = true,
                _ => {}
            }
            return polled;
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.rewrite.as_ref().is_some_and(ModelRewrite::has_pending) {
            return false;
        }
        match &self.inner {
            Inner::Local(body) => body.is_end_stream(),
            Inner::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewrite.is_some() {
            return SizeHint::default();
        }
        match &self.inner {
            Inner::Local(body) => body.size_hint(),
            Inner::Upstream(body) => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(entry) = self.log.take() {
            let completed = self.completed || self.is_end_stream();
            entry.emit(self.bytes, completed);
        }
    }
}

/// hyper-util's error says only which step failed ("client error (SendRequest)"); the cause
/// (a reset, a connection closed before the answer) is in its sources, which anyhow's
/// alternate form prints as one line.
fn error_chain(e: hyper_util::client::legacy::Error) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_may_reload() {
        for ok in ["127.0.0.1:5000", "127.8.9.10:1", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert!(admin_allowed(ok.parse().unwrap()), "{ok} refused");
        }
        for refused in ["10.0.0.2:5000", "192.168.1.7:80", "[2001:db8::1]:5000", "[::ffff:10.0.0.2]:5000", "0.0.0.0:1"] {
            assert!(!admin_allowed(refused.parse().unwrap()), "{refused} allowed");
        }
    }
}
