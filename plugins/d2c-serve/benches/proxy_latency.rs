//! What d2c-serve adds on top of llama-server: latency (p50/p99) and throughput of the same
//! requests sent through the plugin and directly to its llama-server, on loopback.
//!
//!     cargo bench -p d2c-serve --bench proxy_latency -- [--requests N] [--concurrency C]
//!         [--n-predict N] [--tokenize N] [--max-seconds S] [--threads T] [--workers W]
//!
//! Phases (each bounded by its request count and by --max-seconds):
//! 1. completion latency: `/completion` with n_predict tokens, one client, routed and direct
//!    requests interleaved so that load drift on the machine hits both sides alike. Direct
//!    requests carry the exact `lora` list the plugin would add, so llama-server does the same
//!    work; the prompt is cached, so each request costs llama-server a few decodes.
//! 2. proxy overhead: `/tokenize` (no decode at all), interleaved the same way: the cleanest
//!    view of the plugin's own cost, since llama-server answers it in microseconds.
//! 3. throughput: C clients in parallel, first all direct, then all routed.
//!
//! Needs the assets of scripts/setup.sh (or D2C_BASE_MODEL / D2C_LLAMA_SERVER).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Args {
    requests: usize,
    concurrency: usize,
    n_predict: usize,
    tokenize: usize,
    max_seconds: f64,
    threads: usize,
    workers: usize,
}

fn args() -> Args {
    let mut a = Args { requests: 300, concurrency: 4, n_predict: 2, tokenize: 2000, max_seconds: 60.0, threads: 1, workers: 0 };
    let argv: Vec<String> = std::env::args().skip(1).filter(|s| s != "--bench").collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> f64 { it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} needs a number")) };
        match flag.as_str() {
            "--requests" => a.requests = value(flag) as usize,
            "--concurrency" => a.concurrency = value(flag).max(1.0) as usize,
            "--n-predict" => a.n_predict = value(flag) as usize,
            "--tokenize" => a.tokenize = value(flag) as usize,
            "--max-seconds" => a.max_seconds = value(flag),
            "--threads" => a.threads = value(flag).max(1.0) as usize,
            "--workers" => a.workers = value(flag) as usize,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Stats {
    p50: f64,
    p99: f64,
    n: usize,
}

fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(f64::total_cmp);
    Stats { p50: percentile(&ms, 50.0), p99: percentile(&ms, 99.0), n: ms.len() }
}

fn timed_post(agent: &ureq::Agent, url: &str, body: &Value) -> f64 {
    let t = Instant::now();
    let mut resp = agent.post(url).send_json(body).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(resp.status(), 200, "POST {url}");
    resp.body_mut().read_to_string().unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

/// Interleaved routed/direct pairs; returns (routed ms, direct ms, paired differences ms).
fn interleaved(agent: &ureq::Agent, n: usize, max: Duration, routed: (&str, &Value), direct: (&str, &Value)) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut r, mut d, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = Instant::now() + max;
    for i in 0..n {
        if Instant::now() > deadline {
            break;
        }
        // Alternate which side goes first, so neither always follows the other.
        let (a, b) = if i % 2 == 0 {
            let a = timed_post(agent, routed.0, routed.1);
            (a, timed_post(agent, direct.0, direct.1))
        } else {
            let b = timed_post(agent, direct.0, direct.1);
            (timed_post(agent, routed.0, routed.1), b)
        };
        r.push(a);
        d.push(b);
        diff.push(a - b);
    }
    (r, d, diff)
}

/// `clients` threads share `total` requests; returns (requests done, seconds).
fn throughput(clients: usize, total: usize, max: Duration, url: &str, body: &Value) -> (usize, f64) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let deadline = start + max;
    std::thread::scope(|s| {
        for _ in 0..clients {
            let agent = agent();
            let next = &next;
            s.spawn(move || {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total && Instant::now() < deadline {
                    timed_post(&agent, url, body);
                }
            });
        }
    });
    (next.load(std::sync::atomic::Ordering::Relaxed).min(total), start.elapsed().as_secs_f64())
}

fn row(name: &str, routed: &Stats, direct: &Stats, diff: &Stats) {
    println!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} |",
        routed.n,
        direct.p50,
        routed.p50,
        direct.p99,
        routed.p99,
        routed.p50 - direct.p50,
        diff.p50
    );
}

fn main() {
    let a = args();
    let max = Duration::from_secs_f64(a.max_seconds);
    let fixture = Fixture::new(&[("summarize", 0), ("translate", 1), ("classify", 2), ("extract", 0)], 3);
    let server = llama_server();
    let threads = a.threads.to_string();
    let workers = a.workers.to_string();
    let args = [
        "--manifest",
        fixture.manifest.to_str().unwrap(),
        "--llama-server",
        server.to_str().unwrap(),
        "--port",
        "0",
        "--workers",
        &workers,
        "--",
        "-c",
        "2048",
        "-np",
        "1",
        "-t",
        &threads,
    ];
    let plugin = match try_start_plugin(&args, &fixture.dir.path().join("bench.log")) {
        Ok(p) => p,
        Err((code, log)) => panic!("d2c-serve exited with {code}:\n{log}"),
    };
    let agent = agent();

    let prompt = "The three most important things about rivers are";
    let routed_body = json!({"task": "translate", "prompt": prompt, "n_predict": a.n_predict, "temperature": 0.0, "top_k": 1, "seed": 1});
    let mut direct_body = routed_body.clone();
    direct_body.as_object_mut().unwrap().remove("task");
    direct_body["lora"] = lora_list(3, Some(1));
    let routed_url = plugin.url("/completion");
    let direct_url = plugin.upstream("/completion");
    let tokenize_body = json!({"content": prompt});
    let (tok_routed, tok_direct) = (plugin.url("/tokenize"), plugin.upstream("/tokenize"));

    // Warm-up: connection pools, prompt cache, page cache.
    interleaved(&agent, 20, max, (&routed_url, &routed_body), (&direct_url, &direct_body));
    interleaved(&agent, 50, max, (&tok_routed, &tokenize_body), (&tok_direct, &tokenize_body));

    let (r, d, diff) = interleaved(&agent, a.requests, max, (&routed_url, &routed_body), (&direct_url, &direct_body));
    let (tr, td, tdiff) = interleaved(&agent, a.tokenize, max, (&tok_routed, &tokenize_body), (&tok_direct, &tokenize_body));

    println!(
        "d2c-serve overhead on loopback ({} cores online, llama-server -t {}, n_predict {}, d2c-serve --workers {})",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        a.threads,
        a.n_predict,
        a.workers
    );
    println!();
    println!("| request | pairs | direct p50 ms | routed p50 ms | direct p99 ms | routed p99 ms | p50 added ms | median paired diff ms |");
    println!("|---|---|---|---|---|---|---|---|");
    row(&format!("/completion n_predict={}", a.n_predict), &stats(r), &stats(d), &stats(diff));
    row("/tokenize", &stats(tr), &stats(td), &stats(tdiff));

    let total = a.requests.max(a.concurrency);
    let (n_direct, s_direct) = throughput(a.concurrency, total, max, &direct_url, &direct_body);
    let (n_routed, s_routed) = throughput(a.concurrency, total, max, &routed_url, &routed_body);
    println!();
    println!("| throughput, {} clients | requests | direct req/s | routed req/s | routed/direct |", a.concurrency);
    println!("|---|---|---|---|---|");
    let (rd, rr) = (n_direct as f64 / s_direct, n_routed as f64 / s_routed);
    println!("| /completion n_predict={} | {} + {} | {:.1} | {:.1} | {:.3} |", a.n_predict, n_direct, n_routed, rd, rr, rr / rd);
    let (n_direct, s_direct) = throughput(a.concurrency, a.tokenize, max, &tok_direct, &tokenize_body);
    let (n_routed, s_routed) = throughput(a.concurrency, a.tokenize, max, &tok_routed, &tokenize_body);
    let (rd, rr) = (n_direct as f64 / s_direct, n_routed as f64 / s_routed);
    println!("| /tokenize | {} + {} | {:.1} | {:.1} | {:.3} |", n_direct, n_routed, rd, rr, rr / rd);
}
