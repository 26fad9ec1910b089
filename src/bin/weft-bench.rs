//! `weft-bench`: the small load tool of weft's benchmarks (scripts/bench.sh, BENCHMARKS.md).
//!
//! It is both ends of the app traffic: `serve` runs in the server pod; `connrate`, `latency`
//! and `hold` run in the client pod and go through whatever tunnel captures it (or none). Every
//! command is bounded in time and in count, and prints one JSON line with its figures on
//! stdout (a human summary goes to stderr).
//!
//! The first byte of each connection tells the server what to do:
//! - `E` echo: everything is written back; the server half-closes after the client does.
//! - `R` request/reply: a u16 big-endian length and that many bytes; the server writes them back
//!   and closes first, so TIME_WAIT stays on the server side and a connection-rate run does not
//!   exhaust the client's ports.
//!
//! Throughput is iperf3's job, not this tool's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

const ECHO: u8 = b'E';
const REQUEST: u8 = b'R';
/// Longest anything may take on one connection (connect, a round trip, a reply).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "weft-bench",
    version,
    about = "Bounded load generator and app server for weft's benchmarks"
)]
struct Cli {
    /// Runtime worker threads (1 keeps the load tool's own CPU use predictable).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The app server: echo and request/reply on one port.
    Serve {
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: SocketAddr,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 3600)]
        duration: u64,
        /// Most connections open at once; further accepts wait.
        #[arg(long, default_value_t = 20_000)]
        max_conns: usize,
    },
    /// New connections per second: each connects, sends a small request, reads the reply and
    /// closes after the server.
    Connrate {
        #[arg(long)]
        target: SocketAddr,
        /// Stop starting connections after this many seconds.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Stop after this many connections in total.
        #[arg(long, default_value_t = 1_000_000)]
        max: u64,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u64,
        /// Request (and reply) payload in bytes.
        #[arg(long, default_value_t = 64)]
        size: u16,
        /// The client closes first (echo, then half-close) instead of the server: TIME_WAIT then
        /// lands on the client side of every hop, as with most request/response clients.
        #[arg(long)]
        client_closes: bool,
    },
    /// Round-trip latency on one warm connection: p50/p90/p99 of `count` echoes.
    Latency {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Round trips done first and not counted.
        #[arg(long, default_value_t = 500)]
        warmup: u64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Opens `count` connections (each proves itself with one small echo), holds them idle for
    /// `hold` seconds, then closes them all.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        #[arg(long, default_value_t = 10)]
        hold: u64,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: u64,
        /// Give up opening after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve {
                listen,
                duration,
                max_conns,
            } => serve(listen, Duration::from_secs(duration), max_conns).await,
            Command::Connrate {
                target,
                duration,
                max,
                concurrency,
                size,
                client_closes,
            } => {
                let order = if client_closes {
                    CloseOrder::ClientFirst
                } else {
                    CloseOrder::ServerFirst
                };
                connrate(
                    target,
                    Duration::from_secs(duration),
                    max,
                    concurrency,
                    size,
                    order,
                )
                .await
            }
            Command::Latency {
                target,
                count,
                warmup,
                size,
                timeout,
            } => latency(target, count, warmup, size, Duration::from_secs(timeout)).await,
            Command::Hold {
                target,
                count,
                hold,
                concurrency,
                timeout,
            } => {
                hold_idle(
                    target,
                    count,
                    Duration::from_secs(hold),
                    concurrency,
                    Duration::from_secs(timeout),
                )
                .await
            }
        }
    })
}

/// Bounds one step on a connection; a step that hangs is an error, not a stuck benchmark.
async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(IO_TIMEOUT, fut).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no progress in {IO_TIMEOUT:?}"),
    }
}

async fn connect(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = bounded(
        &format!("connecting to {target}"),
        TcpStream::connect(target),
    )
    .await?;
    s.set_nodelay(true)
        .context("setting TCP_NODELAY on the client socket")?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// serve

async fn serve(listen: SocketAddr, duration: Duration, max_conns: usize) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = l.local_addr().context("listener address")?;
    println!("ready {addr}");
    eprintln!("weft-bench serve: listening on {addr} for at most {duration:?}");
    let slots = Arc::new(Semaphore::new(max_conns.max(1)));
    let accepted = Arc::new(AtomicU64::new(0));
    let accept_loop = {
        let accepted = accepted.clone();
        async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                match l.accept().await {
                    Ok((s, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(async move {
                            let _ = serve_one(s).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        eprintln!(
                            "weft-bench serve: accept failed: {e} (is ulimit -n high enough?)"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = accept_loop => {}
        () = tokio::time::sleep(duration) => {}
        _ = terminate() => {}
    }
    eprintln!(
        "weft-bench serve: {} connections accepted",
        accepted.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn terminate() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        r = tokio::signal::ctrl_c() => r,
    }
}

async fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    match s.read_u8().await? {
        ECHO => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        REQUEST => {
            let len = s.read_u16().await? as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await?;
            s.write_all(&body).await?;
            s.shutdown().await?;
            // Wait (bounded) for the client's FIN so the close is orderly rather than a reset.
            let mut rest = [0u8; 64];
            let _ = tokio::time::timeout(IO_TIMEOUT, s.read(&mut rest)).await;
            Ok(())
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown request type {other:#04x}"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// connrate

/// Which side of a connection-rate connection sends the first FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CloseOrder {
    /// `R` request: the server answers and closes; the client reads to EOF.
    ServerFirst,
    /// `E` echo: the client reads its echo, half-closes, then reads the server's EOF.
    ClientFirst,
}

impl CloseOrder {
    fn name(self) -> &'static str {
        match self {
            CloseOrder::ServerFirst => "server",
            CloseOrder::ClientFirst => "client",
        }
    }

    /// The bytes a client sends for a payload of `size` bytes.
    fn request(self, size: u16) -> Vec<u8> {
        let mut request = match self {
            CloseOrder::ServerFirst => {
                let mut r = vec![REQUEST];
                r.extend_from_slice(&size.to_be_bytes());
                r
            }
            CloseOrder::ClientFirst => vec![ECHO],
        };
        request.resize(request.len() + size as usize, 0x5a);
        request
    }
}

async fn request_reply(
    target: SocketAddr,
    request: Arc<Vec<u8>>,
    order: CloseOrder,
) -> anyhow::Result<()> {
    let mut s = connect(target).await?;
    bounded("sending the request", s.write_all(&request)).await?;
    let mut reply = Vec::with_capacity(request.len());
    let want = match order {
        CloseOrder::ServerFirst => {
            bounded("reading the reply", s.read_to_end(&mut reply)).await?;
            request.len() - 3
        }
        CloseOrder::ClientFirst => {
            let want = request.len() - 1;
            reply.resize(want, 0);
            bounded("reading the echo", s.read_exact(&mut reply)).await?;
            bounded("half-closing", s.shutdown()).await?;
            let mut rest = Vec::new();
            bounded("waiting for the server to close", s.read_to_end(&mut rest)).await?;
            if !rest.is_empty() {
                bail!("{} unexpected bytes after the echo", rest.len());
            }
            want
        }
    };
    if reply.len() != want {
        bail!("reply of {} bytes, expected {want}", reply.len());
    }
    Ok(())
}

async fn connrate(
    target: SocketAddr,
    duration: Duration,
    max: u64,
    concurrency: u64,
    size: u16,
    order: CloseOrder,
) -> anyhow::Result<()> {
    let request = Arc::new(order.request(size));
    // One probe first: a target that does not answer at all is an error, not a rate of zero.
    request_reply(target, request.clone(), order)
        .await
        .with_context(|| format!("first request to {target}"))?;

    let started = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency.clamp(1, 10_000))
        .map(|_| {
            let (request, started) = (request.clone(), started.clone());
            tokio::spawn(async move {
                let mut ok = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < max {
                    let t = Instant::now();
                    match request_reply(target, request.clone(), order).await {
                        Ok(()) => ok.push(t.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (ok, errors, first_error)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let (ok, e, first) = w.await.context("a connrate worker panicked")?;
        times.extend(ok);
        errors += e;
        if first_error.is_none() {
            first_error = first;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = times.len() as u64;
    let rate = n as f64 / secs;
    let (p50, p99) = (quantile_us(&mut times, 0.50), quantile_us(&mut times, 0.99));
    eprintln!(
        "weft-bench connrate {target}: {n} connections in {secs:.2}s = {rate:.0}/s, \
         {errors} errors, per connection p50 {p50:.0} µs p99 {p99:.0} µs ({} closes first)",
        order.name()
    );
    if let Some(e) = &first_error {
        eprintln!("weft-bench connrate: first error: {e}");
    }
    println!(
        "{{\"test\":\"connrate\",\"target\":\"{target}\",\"concurrency\":{concurrency},\
         \"closes_first\":\"{}\",\"connections\":{n},\"errors\":{errors},\"seconds\":{secs:.3},\
         \"per_second\":{rate:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1}}}",
        order.name()
    );
    Ok(())
}

/// The `q` quantile of `samples` in microseconds (sorts them).
fn quantile_us(samples: &mut [Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let idx = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[idx.min(samples.len() - 1)].as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// latency

async fn latency(
    target: SocketAddr,
    count: u64,
    warmup: u64,
    size: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let run = async {
        let mut s = connect(target).await?;
        bounded("starting the echo", s.write_u8(ECHO)).await?;
        let out = vec![0xa5u8; size.max(1)];
        let mut back = vec![0u8; out.len()];
        let mut times = Vec::with_capacity(count as usize);
        for i in 0..warmup + count {
            let t = Instant::now();
            bounded("sending", s.write_all(&out)).await?;
            bounded("reading the echo", s.read_exact(&mut back)).await?;
            if i >= warmup {
                times.push(t.elapsed());
            }
        }
        bounded("closing", s.shutdown()).await?;
        Ok::<_, anyhow::Error>(times)
    };
    let mut times = match tokio::time::timeout(limit, run).await {
        Ok(r) => r?,
        Err(_) => bail!("latency run to {target} did not finish within {limit:?}"),
    };
    let n = times.len();
    let mean = times.iter().map(Duration::as_secs_f64).sum::<f64>() / n.max(1) as f64 * 1e6;
    let p50 = quantile_us(&mut times, 0.50);
    let p90 = quantile_us(&mut times, 0.90);
    let p99 = quantile_us(&mut times, 0.99);
    let max = quantile_us(&mut times, 1.0);
    eprintln!(
        "weft-bench latency {target}: {n} round trips of {size} B: p50 {p50:.1} µs, \
         p90 {p90:.1} µs, p99 {p99:.1} µs, max {max:.1} µs, mean {mean:.1} µs"
    );
    println!(
        "{{\"test\":\"latency\",\"target\":\"{target}\",\"size\":{size},\"count\":{n},\
         \"p50_us\":{p50:.1},\"p90_us\":{p90:.1},\"p99_us\":{p99:.1},\"max_us\":{max:.1},\
         \"mean_us\":{mean:.1}}}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hold

async fn open_idle(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = connect(target).await?;
    let hello = [ECHO, b'h', b'e', b'l', b'l', b'o'];
    bounded("sending hello", s.write_all(&hello)).await?;
    let mut back = [0u8; 5];
    bounded("reading the echo", s.read_exact(&mut back)).await?;
    if back != hello[1..] {
        bail!("echo came back altered");
    }
    Ok(s)
}

async fn hold_idle(
    target: SocketAddr,
    count: u64,
    hold: Duration,
    concurrency: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + limit;
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency.clamp(1, 1000))
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < count {
                    match open_idle(target).await {
                        Ok(s) => held.push(s),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (held, errors, first_error)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(count as usize);
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let (h, e, first) = w.await.context("a hold worker panicked")?;
        held.extend(h);
        errors += e;
        if first_error.is_none() {
            first_error = first;
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "weft-bench hold {target}: {} of {count} connections open after {open_secs:.2}s \
         ({errors} errors); holding them idle for {hold:?}",
        held.len()
    );
    if let Some(e) = &first_error {
        eprintln!("weft-bench hold: first error: {e} (is ulimit -n high enough?)");
    }
    println!(
        "{{\"test\":\"hold\",\"target\":\"{target}\",\"held\":{},\"errors\":{errors},\
         \"open_seconds\":{open_secs:.3},\"hold_seconds\":{}}}",
        held.len(),
        hold.as_secs()
    );
    tokio::select! {
        () = tokio::time::sleep(hold) => {}
        _ = terminate() => {}
    }
    drop(held);
    Ok(())
}
