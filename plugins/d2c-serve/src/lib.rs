//! d2c-serve: serves a d2c-gguf `manifest.json` through llama-server.
//!
//! One llama-server holds the base model and every merged adapter (loaded, not applied); this
//! plugin sits in front of it and turns "which task?" into llama-server's per-request `lora`
//! list. Start-up refuses to serve anything whose bytes differ from what the manifest hashed.
//!
//! Modules: [`routes`] (the immutable task -> adapter table), [`upstream`] (the llama-server
//! child or attached server), [`supervisor`] (generations: live reload and draining),
//! [`proxy`] (the HTTP front), [`log`] (one JSON line per event).

pub mod log;
pub mod proxy;
mod rewrite;
pub mod routes;
pub mod supervisor;
mod sys;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use serde_json::json;

use crate::proxy::{Limits, Proxy};
use crate::supervisor::{Current, Signals, Started, Supervisor};

/// Command line of `d2c-serve`.
#[derive(Debug, Clone, Parser)]
#[command(name = "d2c-serve", version, about = "Serve a d2c-gguf manifest through llama-server, routing each task to its adapter")]
pub struct Options {
    /// manifest.json written by `d2c-gguf merge`.
    #[arg(long)]
    pub manifest: PathBuf,
    /// llama-server binary to start as a child (base model + every adapter of the manifest).
    #[arg(long, required_unless_present = "attach", conflicts_with = "attach")]
    pub llama_server: Option<PathBuf>,
    /// Use an already running llama-server (http://HOST:PORT) instead of starting one; its
    /// adapters must be the manifest's, in manifest order.
    #[arg(long, value_name = "URL")]
    pub attach: Option<String>,
    /// Address this plugin listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port this plugin listens on (0 = any free port; the chosen one is logged).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Loopback port of the first child llama-server (0 = any free port; a reload's server
    /// always takes a free port, since it starts beside the one it replaces).
    #[arg(long, default_value_t = 0)]
    pub upstream_port: u16,
    /// Append the child llama-server's stdout/stderr to this file instead of inheriting ours.
    #[arg(long, value_name = "PATH")]
    pub upstream_log: Option<PathBuf>,
    /// Seconds to wait for llama-server to become healthy.
    #[arg(long, default_value_t = 300)]
    pub startup_timeout: u64,
    /// Seconds a replaced llama-server may keep serving the requests it started (streams
    /// included) after a reload; it is stopped as soon as they end, and at this limit at latest.
    #[arg(long, default_value_t = 600)]
    pub drain_timeout: u64,
    /// Seconds to wait for llama-server's response head (generation included for non-streamed requests).
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Largest request body accepted, in bytes (larger: 413).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Worker threads of the plugin's runtime (0 = one per core; 1 = a single-threaded runtime).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Connections served at once; further clients wait in the accept queue.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Extra arguments for the child llama-server (after `--`), e.g. `-- -c 4096 -t 8`.
    #[arg(last = true, value_name = "LLAMA_SERVER_ARGS")]
    pub llama_server_args: Vec<String>,
}

/// Flags the plugin sets itself: passing them again would silently fight the plugin's choice.
const RESERVED_SERVER_FLAGS: [&str; 8] =
    ["-m", "--model", "--host", "--port", "--lora", "--lora-scaled", "--lora-init-without-apply", "--api-prefix"];

impl Options {
    fn check(&self) -> Result<()> {
        if self.attach.is_some() && !self.llama_server_args.is_empty() {
            bail!("llama-server arguments after `--` need a child server; they cannot apply to --attach");
        }
        for arg in &self.llama_server_args {
            let flag = arg.split('=').next().unwrap_or(arg);
            if RESERVED_SERVER_FLAGS.contains(&flag) {
                bail!("llama-server argument {arg:?} is set by d2c-serve itself (model and adapters from the manifest); remove it");
            }
        }
        if self.max_body_bytes == 0 || self.max_connections == 0 {
            bail!("--max-body-bytes and --max-connections must be positive");
        }
        Ok(())
    }
}

/// The async runtime `--workers` asks for.
pub fn runtime(opts: &Options) -> std::io::Result<tokio::runtime::Runtime> {
    match opts.workers {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

/// Runs until SIGINT/SIGTERM (Ok) or until the current llama-server dies (Err); SIGHUP and
/// `POST /admin/reload` swap in the manifest's current contents live ([`supervisor`]).
///
/// Must be polled on the thread that lives as long as the process (`Runtime::block_on` on the
/// main thread): a child's parent-death signal fires when the *thread* that spawned it exits.
pub async fn run(opts: Options) -> Result<()> {
    opts.check()?;
    let started = Instant::now();
    let client = proxy::upstream_client();
    let mut signals = Signals::new()?;

    // Hashes are checked before anything is started: a mismatch leaves no process behind. A
    // signal during start-up drops the attempt, and with it (ChildServer's Drop) the child.
    let first = tokio::select! {
        r = supervisor::start_generation(&opts, &client, 0) => r?,
        signal = signals.recv_stop("startup") => {
            log::event("shutdown", json!({"signal": signal.name(), "phase": "startup"}));
            return Ok(());
        }
    };
    let Started { generation, mut child } = first;

    let listener = match tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await {
        Ok(l) => l,
        Err(e) => {
            if let Some(child) = child.as_mut() {
                child.stop(Duration::from_secs(10)).await;
            }
            return Err(anyhow::Error::new(e).context(format!("cannot listen on {}:{}", opts.host, opts.port)));
        }
    };
    let addr: SocketAddr = listener.local_addr()?;
    let limits = Limits {
        max_body_bytes: opts.max_body_bytes,
        body_timeout: Duration::from_secs(30),
        header_timeout: Duration::from_secs(30),
        upstream_timeout: Duration::from_secs(opts.request_timeout),
    };
    let mode = if child.is_some() { "child" } else { "attach" };
    log::event(
        "listening",
        json!({
            "addr": addr.to_string(),
            "upstream": generation.upstream.url(),
            "mode": mode,
            "tasks": generation.table.task_count(),
            "startup_ms": started.elapsed().as_secs_f64() * 1e3,
        }),
    );
    let current = Arc::new(Current::new(generation));
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(16);
    let proxy = Arc::new(Proxy::new(current.clone(), client.clone(), limits, mode, reload_tx));
    let accept = tokio::spawn(proxy::serve(listener, proxy, opts.max_connections));
    Supervisor::new(opts, client, current, child).run(&mut signals, &mut reload_rx, accept).await
}
