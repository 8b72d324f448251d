//! The llama-server behind the plugin: a child we start and stop, or one we attach to; and the
//! start-up checks that it holds exactly the manifest's adapters.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use serde_json::{json, Value};

use crate::proxy::UpstreamClient;
use crate::routes::RoutingTable;
use crate::sys::{self, Signal};

/// Where llama-server listens: plain HTTP, `host:port`.
#[derive(Debug, Clone)]
pub struct Upstream {
    authority: String,
}

impl Upstream {
    pub fn loopback(port: u16) -> Self {
        Upstream { authority: format!("127.0.0.1:{port}") }
    }

    /// Accepts `http://HOST:PORT` (an optional trailing `/`); llama-server's API lives at the root.
    pub fn parse(url: &str) -> Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("--attach {url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--attach {url:?}: only http:// is supported (llama-server on a trusted network or loopback)");
        }
        let Some(authority) = uri.authority() else { bail!("--attach {url:?}: no host") };
        if authority.port_u16().is_none() {
            bail!("--attach {url:?}: give the port explicitly");
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            bail!("--attach {url:?}: give only http://HOST:PORT, without a path");
        }
        Ok(Upstream { authority: authority.as_str().to_owned() })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.authority)
    }

    pub fn uri(&self, path_and_query: &str) -> Result<Uri> {
        Ok(format!("http://{}{}", self.authority, path_and_query).parse()?)
    }
}

/// A free loopback port, found by binding port 0. Another process could take it before
/// llama-server binds it; llama-server then exits and start-up reports that.
pub fn free_loopback_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// llama-server started by us: its own process group, killed with us.
pub struct ChildServer {
    child: tokio::process::Child,
    pid: u32,
    reaped: bool,
}

impl ChildServer {
    /// Starts `program` with the base model and every adapter of `table` (one comma-separated
    /// `--lora` list in manifest order: repeating `--lora` is deprecated and keeps only the last),
    /// loaded but not applied, on 127.0.0.1:`port`.
    pub fn spawn(program: &Path, table: &RoutingTable, port: u16, extra_args: &[String], log_file: Option<&Path>) -> Result<Self> {
        let mut cmd = std::process::Command::new(program);
        cmd.arg("-m").arg(table.base_model()).args(["--host", "127.0.0.1", "--port", &port.to_string()]);
        if !table.adapters().is_empty() {
            let list: Vec<String> = table.adapters().iter().map(|a| a.path.to_string_lossy().into_owned()).collect();
            cmd.arg("--lora").arg(list.join(",")).arg("--lora-init-without-apply");
        }
        cmd.args(extra_args).stdin(Stdio::null());
        if let Some(path) = log_file {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open --upstream-log {}", path.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        // Own process group: a terminal's Ctrl-C reaches only us, so we decide the stop order,
        // and stopping signals the whole group.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        sys::kill_child_when_parent_dies(&mut cmd);
        let child = tokio::process::Command::from(cmd).spawn().with_context(|| format!("cannot start llama-server {}", program.display()))?;
        let pid = child.id().context("llama-server exited at once")?;
        Ok(ChildServer { child, pid, reaped: false })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit (cancel-safe).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        if status.is_ok() {
            self.reaped = true;
        }
        status
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        if status.is_some() {
            self.reaped = true;
        }
        status
    }

    /// SIGTERM to the group, SIGKILL after `grace`, then reap. Idempotent.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            let _ = sys::signal_process_group(self.pid, Signal::Kill);
            return Some(status);
        }
        let _ = sys::signal_process_group(self.pid, Signal::Terminate);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = sys::signal_process_group(self.pid, Signal::Kill);
                self.child.wait().await.ok()
            }
        };
        self.reaped = true;
        // Whatever else the group holds (a wrapper's helpers) goes too.
        let _ = sys::signal_process_group(self.pid, Signal::Kill);
        status
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // Early error or panic: never leave llama-server behind. tokio reaps the zombie.
        if !self.reaped {
            let _ = sys::signal_process_group(self.pid, Signal::Kill);
        }
    }
}

/// GET `path`, returning the status and the JSON body (`Null` if not JSON).
pub async fn get_json(client: &UpstreamClient, upstream: &Upstream, path: &str, timeout: Duration) -> Result<(StatusCode, Value)> {
    let req = Request::get(upstream.uri(path)?).body(Full::new(Bytes::new()))?;
    send_json(client, req, timeout).await
}

pub async fn post_json(client: &UpstreamClient, upstream: &Upstream, path: &str, body: &Value, timeout: Duration) -> Result<(StatusCode, Value)> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(upstream.uri(path)?)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    send_json(client, req, timeout).await
}

async fn send_json(client: &UpstreamClient, req: Request<Full<Bytes>>, timeout: Duration) -> Result<(StatusCode, Value)> {
    let what = format!("{} {}", req.method(), req.uri());
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .with_context(|| format!("{what}: no answer within {timeout:?}"))?
        .with_context(|| format!("{what}: llama-server unreachable"))?;
    let status = resp.status();
    let body = tokio::time::timeout(timeout, Limited::new(resp.into_body(), 16 << 20).collect())
        .await
        .with_context(|| format!("{what}: body not received within {timeout:?}"))?
        .map_err(|e| anyhow::anyhow!("{what}: reading body: {e}"))?
        .to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// Polls `GET /health` until 200. A child that exits meanwhile fails at once, with its status.
pub async fn wait_healthy(client: &UpstreamClient, upstream: &Upstream, mut child: Option<&mut ChildServer>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last: String;
    loop {
        if let Some(child) = child.as_deref_mut() {
            if let Some(status) = child.exited() {
                bail!("llama-server (pid {}) exited during start-up ({status}); its log says why", child.pid());
            }
        }
        match get_json(client, upstream, "/health", Duration::from_secs(5)).await {
            Ok((StatusCode::OK, _)) => return Ok(()),
            Ok((status, body)) => last = format!("HTTP {status} {body}"),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("llama-server at {} not healthy after {timeout:?}: {last}", upstream.url());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug)]
struct LoadedAdapter {
    id: u64,
    path: String,
    scale: f64,
}

async fn loaded_adapters(client: &UpstreamClient, upstream: &Upstream) -> Result<Vec<LoadedAdapter>> {
    let (status, body) = get_json(client, upstream, "/lora-adapters", Duration::from_secs(10)).await?;
    if status != StatusCode::OK {
        bail!("GET {}/lora-adapters answered HTTP {status}: {body}", upstream.url());
    }
    let Some(list) = body.as_array() else { bail!("GET {}/lora-adapters: expected a JSON array, got {body}", upstream.url()) };
    list.iter()
        .map(|a| {
            Ok(LoadedAdapter {
                id: a["id"].as_u64().with_context(|| format!("GET /lora-adapters: entry without an integer id: {a}"))?,
                path: a["path"].as_str().unwrap_or_default().to_owned(),
                scale: a["scale"].as_f64().unwrap_or(f64::NAN),
            })
        })
        .collect()
}

/// The server's adapters must be the manifest's, in manifest order: per-request `lora` ids are
/// positions, and llama-server silently ignores ids it does not have.
pub async fn check_adapters(client: &UpstreamClient, upstream: &Upstream, table: &RoutingTable) -> Result<()> {
    let loaded = loaded_adapters(client, upstream).await?;
    let expected = table.adapters();
    if loaded.len() != expected.len() {
        bail!(
            "llama-server at {} has {} adapter(s) loaded, the manifest {} has {}; start it with --lora {} --lora-init-without-apply",
            upstream.url(),
            loaded.len(),
            table.manifest().display(),
            expected.len(),
            expected.iter().map(|a| a.path.to_string_lossy()).collect::<Vec<_>>().join(",")
        );
    }
    for (i, (have, want)) in loaded.iter().zip(expected).enumerate() {
        if have.id != i as u64 {
            bail!("llama-server at {}: adapter at position {i} has id {}, expected {i}", upstream.url(), have.id);
        }
        if !same_file(&have.path, &want.path, &want.blake3) {
            bail!(
                "llama-server at {}: adapter id {i} is {:?}, the manifest's adapter {i} is {} (order and files must match the manifest)",
                upstream.url(),
                have.path,
                want.path.display()
            );
        }
    }
    Ok(())
}

/// Same path, or (the server was started from another directory or through a symlink) a file
/// with the manifest's hash.
fn same_file(reported: &str, want: &Path, want_blake3: &str) -> bool {
    let reported = PathBuf::from(reported);
    if reported.canonicalize().is_ok_and(|p| p == want) {
        return true;
    }
    reported.is_file() && d2c_format::manifest::hash_file(&reported).is_ok_and(|h| h.eq_ignore_ascii_case(want_blake3))
}

/// Global scales to 0 (every id listed), then read back: a request that reaches llama-server
/// without a `lora` field must run on the base model.
pub async fn zero_global_scales(client: &UpstreamClient, upstream: &Upstream, table: &RoutingTable) -> Result<()> {
    if table.adapters().is_empty() {
        return Ok(());
    }
    let zeros: Vec<Value> = (0..table.adapters().len()).map(|id| json!({"id": id, "scale": 0.0})).collect();
    let (status, body) = post_json(client, upstream, "/lora-adapters", &Value::Array(zeros), Duration::from_secs(10)).await?;
    if !status.is_success() {
        bail!("POST {}/lora-adapters answered HTTP {status}: {body}", upstream.url());
    }
    let loaded = loaded_adapters(client, upstream).await?;
    if let Some(a) = loaded.iter().find(|a| a.scale != 0.0) {
        bail!("llama-server kept global scale {} on adapter {} ({}) after it was set to 0", a.scale, a.id, a.path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_urls_must_be_plain_http_with_a_port() {
        assert_eq!(Upstream::parse("http://127.0.0.1:8081").unwrap().url(), "http://127.0.0.1:8081");
        assert_eq!(Upstream::parse("http://localhost:9000/").unwrap().uri("/health?x=1").unwrap().to_string(), "http://localhost:9000/health?x=1");
        for bad in ["https://127.0.0.1:8081", "http://127.0.0.1", "http://127.0.0.1:8081/v1", "127.0.0.1:8081", "not a url"] {
            assert!(Upstream::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
