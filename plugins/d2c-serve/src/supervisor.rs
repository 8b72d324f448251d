//! The served set over time. A *generation* is one verified manifest and the llama-server that
//! holds its adapters. A reload (SIGHUP, or `POST /admin/reload` from loopback) verifies the
//! manifest again, starts the next generation beside the current one, switches new requests to
//! it once healthy, and stops the old llama-server when its last request (streams included) has
//! finished. A reload that fails at any step leaves the current generation serving, untouched.
//!
//! Every llama-server is spawned from the future that `run` polls on the main thread: its
//! parent-death signal is tied to the spawning thread, which must live as long as the process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::log;
use crate::proxy::UpstreamClient;
use crate::routes::RoutingTable;
use crate::upstream::{self, ChildServer, Upstream};
use crate::Options;

/// One manifest as served: its routing table and the llama-server that holds its adapters.
pub struct Generation {
    /// 0 for the set loaded at start-up, then one more per successful reload.
    pub serial: u64,
    pub table: Arc<RoutingTable>,
    pub upstream: Upstream,
    inflight: AtomicUsize,
}

impl Generation {
    pub fn new(serial: u64, table: Arc<RoutingTable>, upstream: Upstream) -> Self {
        Generation { serial, table, upstream, inflight: AtomicUsize::new(0) }
    }

    /// Requests whose response (body included) has not ended yet.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
}

/// A request's hold on the generation it started on, released when its response body ends or
/// is dropped: the old llama-server is stopped only when no such hold is left.
pub struct InFlight(Arc<Generation>);

impl InFlight {
    pub fn generation(&self) -> &Generation {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The generation new requests go to. Reading it takes no lock (`ArcSwap`): the hot path stays
/// as cheap as with a fixed table.
pub struct Current(ArcSwap<Generation>);

impl Current {
    pub fn new(generation: Generation) -> Self {
        Current(ArcSwap::from_pointee(generation))
    }

    /// Holds the current generation for one request. The count is raised before the generation
    /// is checked to be still current, so a switch racing with this call either sees the hold
    /// when it drains the old generation or makes this call retry on the new one.
    pub fn enter(&self) -> InFlight {
        loop {
            let generation = self.0.load_full();
            generation.inflight.fetch_add(1, Ordering::SeqCst);
            let hold = InFlight(generation);
            if Arc::ptr_eq(&hold.0, &self.0.load()) {
                return hold;
            }
        }
    }

    fn switch(&self, next: Arc<Generation>) -> Arc<Generation> {
        self.0.swap(next)
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    Signal,
    Admin,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Admin => "POST /admin/reload",
        }
    }
}

/// `POST /admin/reload` waits on this for the outcome: the new generation's summary, or why
/// the reload was refused.
pub type ReloadReply = oneshot::Sender<std::result::Result<Value, String>>;

/// A generation being started: what it serves, and its llama-server (none when attached).
pub struct Started {
    pub generation: Generation,
    pub child: Option<ChildServer>,
}

/// Verifies the manifest (every hash, before anything is started), then starts and checks the
/// llama-server for it (or checks the attached one). On any error nothing is left running.
pub async fn start_generation(opts: &Options, client: &UpstreamClient, serial: u64) -> Result<Started> {
    let started = Instant::now();
    let table = Arc::new(RoutingTable::load(&opts.manifest)?);
    log::event(
        "manifest_verified",
        json!({
            "manifest": opts.manifest.display().to_string(),
            "generation": serial,
            "adapters": table.adapters().len(),
            "tasks": table.task_count(),
            "ms": started.elapsed().as_secs_f64() * 1e3,
        }),
    );
    let startup_timeout = Duration::from_secs(opts.startup_timeout);
    let Some(program) = &opts.llama_server else {
        let url = opts.attach.as_deref().expect("clap requires --attach without --llama-server");
        let upstream = Upstream::parse(url)?;
        upstream::wait_healthy(client, &upstream, None, startup_timeout).await?;
        upstream::check_adapters(client, &upstream, &table).await?;
        return Ok(Started { generation: Generation::new(serial, table, upstream), child: None });
    };
    // The first llama-server may take the configured port; a reload's runs beside the current
    // one, so it takes a free port.
    let port = match opts.upstream_port {
        p if p != 0 && serial == 0 => p,
        _ => upstream::free_loopback_port()?,
    };
    let mut child = ChildServer::spawn(program, &table, port, &opts.llama_server_args, opts.upstream_log.as_deref())?;
    let upstream = Upstream::loopback(port);
    log::event("upstream_started", json!({"pid": child.pid(), "url": upstream.url(), "generation": serial}));
    let checks = async {
        upstream::wait_healthy(client, &upstream, Some(&mut child), startup_timeout).await?;
        upstream::check_adapters(client, &upstream, &table).await?;
        // `--lora-init-without-apply` still leaves global scales at 1 in this llama-server.
        upstream::zero_global_scales(client, &upstream, &table).await
    };
    if let Err(e) = checks.await {
        stop_child(&mut child, serial, "start-up failed").await;
        return Err(e);
    }
    Ok(Started { generation: Generation::new(serial, table, upstream), child: Some(child) })
}

async fn stop_child(child: &mut ChildServer, serial: u64, why: &str) {
    let pid = child.pid();
    let status = child.stop(Duration::from_secs(10)).await;
    log::event("upstream_stopped", json!({"pid": pid, "generation": serial, "why": why, "status": status.map(|s| s.to_string())}));
}

/// The signals d2c-serve acts on.
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
    Hangup,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
            Signal::Hangup => "SIGHUP",
        }
    }
}

impl Signals {
    /// Registered before any child exists, so that no signal can kill us between spawn and
    /// serve and leave the child behind.
    pub fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
            _ = self.hangup.recv() => Signal::Hangup,
        }
    }

    /// The next SIGINT or SIGTERM; a SIGHUP meanwhile (nothing to reload yet) is logged and
    /// ignored.
    pub async fn recv_stop(&mut self, phase: &str) -> Signal {
        loop {
            match self.recv().await {
                Signal::Hangup => log::event("reload_ignored", json!({"signal": "SIGHUP", "phase": phase})),
                stop => return stop,
            }
        }
    }
}

/// A replaced generation waiting for its last requests.
struct Retiring {
    generation: Arc<Generation>,
    child: Option<ChildServer>,
    since: Instant,
}

/// Owns every llama-server: the current generation's and those of replaced ones still
/// draining. Stops them all when it returns.
pub struct Supervisor {
    opts: Options,
    client: UpstreamClient,
    current: Arc<Current>,
    child: Option<ChildServer>,
    retiring: Vec<Retiring>,
    next_serial: u64,
}

impl Supervisor {
    pub fn new(opts: Options, client: UpstreamClient, current: Arc<Current>, child: Option<ChildServer>) -> Self {
        Supervisor { opts, client, current, child, retiring: Vec::new(), next_serial: 1 }
    }

    /// Serves until SIGINT/SIGTERM (Ok), the current llama-server's death or the accept loop's
    /// failure (Err); then stops every llama-server it owns.
    pub async fn run(
        mut self,
        signals: &mut Signals,
        reloads: &mut mpsc::Receiver<ReloadReply>,
        accept: JoinHandle<std::io::Result<()>>,
    ) -> Result<()> {
        let outcome = self.serve(signals, reloads, accept).await;
        self.stop_all().await;
        outcome
    }

    async fn serve(
        &mut self,
        signals: &mut Signals,
        reloads: &mut mpsc::Receiver<ReloadReply>,
        mut accept: JoinHandle<std::io::Result<()>>,
    ) -> Result<()> {
        let outcome = loop {
            let (trigger, reply) = tokio::select! {
                joined = &mut accept => {
                    break match joined {
                        Ok(Ok(())) => Err(anyhow::anyhow!("accept loop ended")),
                        Ok(Err(e)) => Err(anyhow::Error::new(e).context("accept loop failed")),
                        Err(e) => Err(anyhow::anyhow!("accept loop panicked: {e}")),
                    };
                }
                signal = signals.recv() => match signal {
                    Signal::Hangup => (Trigger::Signal, None),
                    stop => {
                        log::event("shutdown", json!({"signal": stop.name(), "phase": "serving"}));
                        break Ok(());
                    }
                },
                Some(reply) = reloads.recv() => (Trigger::Admin, Some(reply)),
                status = child_exit(self.child.as_mut()) => break Err(upstream_died(status)),
                () = drain_tick(!self.retiring.is_empty()) => {
                    self.drain(false).await;
                    continue;
                }
            };
            match self.reload(trigger, signals).await {
                Flow::Done(result) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                Flow::Stop(outcome) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err("d2c-serve is shutting down".into()));
                    }
                    break outcome;
                }
            }
        };
        accept.abort();
        outcome
    }

    /// One reload, and another if SIGHUP came again meanwhile (the manifest may have changed
    /// after this attempt read it). Shutdown signals and the current server's death still act.
    async fn reload(&mut self, trigger: Trigger, signals: &mut Signals) -> Flow {
        let mut trigger = trigger;
        loop {
            let serial = self.next_serial;
            let started = Instant::now();
            log::event(
                "reload_started",
                json!({"trigger": trigger.name(), "generation": serial, "manifest": self.opts.manifest.display().to_string()}),
            );
            let mut again = false;
            let result = {
                let Supervisor { opts, client, child, .. } = &mut *self;
                let attempt = start_generation(opts, client, serial);
                tokio::pin!(attempt);
                loop {
                    tokio::select! {
                        r = &mut attempt => break r,
                        signal = signals.recv() => match signal {
                            Signal::Hangup => again = true,
                            // Dropping the attempt kills the llama-server it may have started (its Drop).
                            stop => {
                                log::event("shutdown", json!({"signal": stop.name(), "phase": "reload"}));
                                return Flow::Stop(Ok(()));
                            }
                        },
                        status = child_exit(child.as_mut()) => return Flow::Stop(Err(upstream_died(status))),
                    }
                }
            };
            let result = match result {
                Ok(next) => Ok(self.switch(next, started)),
                Err(e) => {
                    let error = format!("{e:#}");
                    log::event(
                        "reload_failed",
                        json!({"trigger": trigger.name(), "error": error, "serving": self.current.0.load().serial, "ms": started.elapsed().as_secs_f64() * 1e3}),
                    );
                    Err(error)
                }
            };
            if !again {
                return Flow::Done(result);
            }
            trigger = Trigger::Signal;
        }
    }

    fn switch(&mut self, next: Started, started: Instant) -> Value {
        self.next_serial += 1;
        let generation = Arc::new(next.generation);
        let old = self.current.switch(generation.clone());
        let old_child = std::mem::replace(&mut self.child, next.child);
        let summary = json!({
            "generation": generation.serial,
            "previous": old.serial,
            "manifest": generation.table.manifest().display().to_string(),
            "adapters": generation.table.adapters().len(),
            "tasks": generation.table.task_count(),
            "upstream": generation.upstream.url(),
            "ms": started.elapsed().as_secs_f64() * 1e3,
        });
        log::event("reload_done", summary.clone());
        self.retiring.push(Retiring { generation: old, child: old_child, since: Instant::now() });
        summary
    }

    /// Stops the llama-server of every replaced generation whose requests have all ended (or
    /// that outlived `--drain-timeout`, or all of them when `force`).
    async fn drain(&mut self, force: bool) {
        let limit = Duration::from_secs(self.opts.drain_timeout);
        let mut i = 0;
        while i < self.retiring.len() {
            let left = self.retiring[i].generation.inflight();
            if left > 0 && !force && self.retiring[i].since.elapsed() < limit {
                i += 1;
                continue;
            }
            let mut retired = self.retiring.swap_remove(i);
            let serial = retired.generation.serial;
            log::event(
                "generation_retired",
                json!({"generation": serial, "requests_cut": left, "drain_ms": retired.since.elapsed().as_secs_f64() * 1e3}),
            );
            if let Some(child) = retired.child.as_mut() {
                stop_child(child, serial, "replaced").await;
            }
        }
    }

    async fn stop_all(&mut self) {
        self.drain(true).await;
        let serial = self.current.0.load().serial;
        if let Some(child) = self.child.as_mut() {
            stop_child(child, serial, "shutdown").await;
        }
    }
}

enum Flow {
    Done(std::result::Result<Value, String>),
    Stop(Result<()>),
}

fn upstream_died(status: std::io::Result<std::process::ExitStatus>) -> anyhow::Error {
    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
    log::event("upstream_exited", json!({"status": status}));
    anyhow::anyhow!("llama-server exited unexpectedly ({status}); d2c-serve stops with it (run it under a supervisor to restart both)")
}

async fn child_exit(child: Option<&mut ChildServer>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

/// Wakes the drain check while replaced generations are waiting; never otherwise.
async fn drain_tick(waiting: bool) {
    if waiting {
        tokio::time::sleep(Duration::from_millis(50)).await;
    } else {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(serial: u64) -> Generation {
        Generation::new(serial, Arc::new(RoutingTable::empty_for_tests()), Upstream::loopback(1))
    }

    #[test]
    fn a_hold_follows_the_switch_and_is_released_with_its_request() {
        let current = Current::new(generation(0));
        let first = current.enter();
        assert_eq!(first.generation().serial, 0);
        let old = current.switch(Arc::new(generation(1)));
        let second = current.enter();
        assert_eq!(second.generation().serial, 1, "new requests go to the new generation");
        assert_eq!(old.inflight(), 1, "the request started before the switch still holds the old one");
        drop(first);
        assert_eq!(old.inflight(), 0);
        assert_eq!(second.generation().inflight(), 1);
    }

    #[test]
    fn holds_taken_while_switching_are_all_counted() {
        let current = Arc::new(Current::new(generation(0)));
        let olds: Vec<Arc<Generation>> = std::thread::scope(|s| {
            for _ in 0..4 {
                let current = current.clone();
                s.spawn(move || {
                    for _ in 0..20_000 {
                        let hold = current.enter();
                        assert!(hold.generation().inflight() >= 1);
                    }
                });
            }
            (1..200).map(|serial| current.switch(Arc::new(generation(serial)))).collect()
        });
        for old in olds {
            assert_eq!(old.inflight(), 0, "generation {} left with a count", old.serial);
        }
    }
}
