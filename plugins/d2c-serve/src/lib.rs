//! d2c-serve: serves a d2c-gguf `manifest.json` through llama-server.
//!
//! One llama-server holds the base model and every merged adapter (loaded, not applied); this
//! plugin sits in front of it and turns "which task?" into llama-server's per-request `lora`
//! list. Start-up refuses to serve anything whose bytes differ from what the manifest hashed.
//!
//! Modules: [`routes`] (the immutable task -> adapter table), [`upstream`] (the llama-server
//! child or attached server), [`proxy`] (the HTTP front), [`log`] (one JSON line per event).

pub mod log;
pub mod proxy;
pub mod routes;
mod sys;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use crate::proxy::{Limits, Proxy};
use crate::routes::RoutingTable;
use crate::upstream::{ChildServer, Upstream};

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
    /// Loopback port of the child llama-server (0 = any free port).
    #[arg(long, default_value_t = 0)]
    pub upstream_port: u16,
    /// Append the child llama-server's stdout/stderr to this file instead of inheriting ours.
    #[arg(long, value_name = "PATH")]
    pub upstream_log: Option<PathBuf>,
    /// Seconds to wait for llama-server to become healthy.
    #[arg(long, default_value_t = 300)]
    pub startup_timeout: u64,
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

/// Runs until SIGINT/SIGTERM (Ok) or until the child llama-server dies (Err).
///
/// Must be polled on the thread that lives as long as the process (`Runtime::block_on` on the
/// main thread): the child's parent-death signal fires when the *thread* that spawned it exits.
pub async fn run(opts: Options) -> Result<()> {
    opts.check()?;
    let started = Instant::now();
    // Hash before anything is started: a mismatch must leave no process behind.
    let table = Arc::new(RoutingTable::load(&opts.manifest)?);
    log::event(
        "manifest_verified",
        json!({
            "manifest": opts.manifest.display().to_string(),
            "adapters": table.adapters().len(),
            "tasks": table.task_count(),
            "ms": started.elapsed().as_secs_f64() * 1e3,
        }),
    );

    let client = proxy::upstream_client();
    // Registered before the child exists so that no signal can kill us between spawn and serve
    // and leave the child behind.
    let mut signals = Signals::new()?;

    let (upstream, mut child) = match &opts.attach {
        Some(url) => (Upstream::parse(url)?, None),
        None => {
            let program = opts.llama_server.as_ref().expect("clap requires --llama-server without --attach");
            let port = match opts.upstream_port {
                0 => upstream::free_loopback_port()?,
                p => p,
            };
            let child = ChildServer::spawn(program, &table, port, &opts.llama_server_args, opts.upstream_log.as_deref())?;
            let upstream = Upstream::loopback(port);
            log::event("upstream_started", json!({"pid": child.pid(), "url": upstream.url()}));
            (upstream, Some(child))
        }
    };

    let startup = async {
        upstream::wait_healthy(&client, &upstream, child.as_mut(), Duration::from_secs(opts.startup_timeout)).await?;
        upstream::check_adapters(&client, &upstream, &table).await?;
        if child.is_some() {
            // `--lora-init-without-apply` still leaves global scales at 1 in this llama-server.
            upstream::zero_global_scales(&client, &upstream, &table).await?;
        }
        anyhow::Ok(())
    };
    let startup_result = tokio::select! {
        r = startup => r,
        signal = signals.recv() => {
            log::event("shutdown", json!({"signal": signal, "phase": "startup"}));
            stop_child(child.as_mut()).await;
            return Ok(());
        }
    };
    if let Err(e) = startup_result {
        stop_child(child.as_mut()).await;
        return Err(e);
    }

    let listener =
        tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await.with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port));
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            stop_child(child.as_mut()).await;
            return Err(e);
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
    let proxy = Arc::new(Proxy::new(table.clone(), upstream.clone(), client, limits, mode));
    log::event(
        "listening",
        json!({
            "addr": addr.to_string(),
            "upstream": upstream.url(),
            "mode": mode,
            "tasks": table.task_count(),
            "startup_ms": started.elapsed().as_secs_f64() * 1e3,
        }),
    );

    let outcome = tokio::select! {
        r = proxy::serve(listener, proxy, opts.max_connections) => r.context("accept loop failed"),
        signal = signals.recv() => {
            log::event("shutdown", json!({"signal": signal, "phase": "serving"}));
            Ok(())
        }
        status = child_exit(child.as_mut()) => {
            let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            log::event("upstream_exited", json!({"status": status}));
            Err(anyhow::anyhow!("llama-server exited unexpectedly ({status}); d2c-serve stops with it (run it under a supervisor to restart both)"))
        }
    };
    stop_child(child.as_mut()).await;
    outcome
}

async fn stop_child(child: Option<&mut ChildServer>) {
    if let Some(child) = child {
        let pid = child.pid();
        let status = child.stop(Duration::from_secs(10)).await;
        log::event("upstream_stopped", json!({"pid": pid, "status": status.map(|s| s.to_string())}));
    }
}

async fn child_exit(child: Option<&mut ChildServer>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
