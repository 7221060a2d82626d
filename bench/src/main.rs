//! `rmq-bench`: a RocketMQ remoting frame peer and the load generator that
//! `scripts/bench` runs through three paths (direct, HAProxy, rmq-agent).
//!
//!   rmq-bench peer --listen ADDR [--listen ADDR...]
//!   rmq-bench throughput --to ADDR --frame-bytes N --seconds S [--rate-mbps R]
//!   rmq-bench latency --to ADDR --count N
//!   rmq-bench idle --to ADDR --conns N --hold-secs S
//!   rmq-bench produce --to BROKER --topic T --queues Q --count N [--body-bytes B] [--prefix P] [--window W]
//!
//! `produce` fills a topic on a real broker for `scripts/bench consume`: SEND_MESSAGE
//! frames, pipelined (at most W unanswered), bodies `<P> i=<i> ` padded to B bytes.
//!
//! Frames are real remoting frames (length, header mark, JSON header, body).
//! The peer answers every request with a response carrying the same opaque:
//! an echo of the body for small requests, an empty body for code 9001
//! ("sink"), so bulk throughput is one-directional but still request/response.
//! Plain threads keep the load generator cheap and its timing honest.
//! Output of the client subcommands is one JSON object per line (read by the script).
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const SINK: i32 = 9001;
const ECHO: i32 = 9002;

fn header(code: i32, opaque: i32, flag: i32) -> Vec<u8> {
    format!(r#"{{"code":{code},"extFields":{{}},"flag":{flag},"language":"JAVA","opaque":{opaque},"serializeTypeCurrentRPC":"JSON","version":401}}"#).into_bytes()
}

fn frame(code: i32, opaque: i32, flag: i32, body: &[u8]) -> Vec<u8> {
    let h = header(code, opaque, flag);
    let mut out = Vec::with_capacity(8 + h.len() + body.len());
    out.extend_from_slice(&((4 + h.len() + body.len()) as i32).to_be_bytes());
    out.extend_from_slice(&(h.len() as i32).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out
}

/// Reads one frame; returns (code, opaque, body length). The body is read into `scratch`.
fn read_frame(r: &mut impl Read, scratch: &mut Vec<u8>) -> std::io::Result<(i32, i32, usize)> {
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre)?;
    let len = u32::from_be_bytes(pre[0..4].try_into().unwrap()) as usize;
    if len > 64 << 20 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "frame longer than 64 MiB"));
    }
    let hlen = (u32::from_be_bytes(pre[4..8].try_into().unwrap()) & 0xFF_FFFF) as usize;
    let mut h = vec![0u8; hlen];
    r.read_exact(&mut h)?;
    let body_len = len
        .checked_sub(4 + hlen)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "frame shorter than its header"))?;
    scratch.resize(body_len, 0);
    r.read_exact(scratch)?;
    let text = String::from_utf8_lossy(&h);
    let num = |k: &str| -> i32 {
        text.split(&format!("\"{k}\":")).nth(1).and_then(|s| s.split([',', '}']).next()).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    Ok((num("code"), num("opaque"), body_len))
}

/// Connects with a timeout: a captured port with no proxy listening drops the SYN
/// (TPROXY blackhole), and the benchmark should say so instead of hanging.
fn connect(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).with_context(|| format!("connect {to}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn peer(addrs: Vec<SocketAddr>) -> Result<()> {
    raise_nofile(u64::MAX);
    let mut handles = Vec::new();
    for a in addrs {
        let l = TcpListener::bind(a).with_context(|| format!("bind {a}"))?;
        handles.push(std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else {
                    // EMFILE and friends: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                // Small stacks: the idle test holds ~1,000 connections per path.
                let spawned = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut w = s.try_clone().expect("clone");
                    let mut r = BufReader::with_capacity(256 * 1024, s);
                    let mut body = Vec::new();
                    while let Ok((code, opaque, _)) = read_frame(&mut r, &mut body) {
                        let resp = if code == SINK { frame(0, opaque, 1, b"") } else { frame(0, opaque, 1, &body) };
                        if w.write_all(&resp).is_err() {
                            break;
                        }
                    }
                });
                if spawned.is_err() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }));
    }
    println!("peer ready");
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn throughput(to: SocketAddr, frame_bytes: usize, seconds: f64, rate_mbps: Option<f64>) -> Result<()> {
    let cpu0 = self_cpu_secs();
    let s = connect(to)?;
    let mut w = s.try_clone()?;
    let done = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let (acked, done) = (acked.clone(), done.clone());
        let mut r = BufReader::new(s);
        std::thread::spawn(move || {
            let mut scratch = Vec::new();
            while read_frame(&mut r, &mut scratch).is_ok() {
                acked.fetch_add(1, Ordering::Relaxed);
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
        })
    };
    let body = vec![b'x'; frame_bytes];
    let f = frame(SINK, 1, 0, &body);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        if let Some(r) = rate_mbps {
            // Pace: never ahead of the target rate.
            let allowed = (t0.elapsed().as_secs_f64() * r * 1e6 / 8.0) as u64;
            if sent * f.len() as u64 > allowed {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        w.write_all(&f)?;
        sent += 1;
    }
    // Count only what the peer confirmed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = w.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    let n = acked.load(Ordering::Relaxed);
    let gbps = (n * f.len() as u64) as f64 * 8.0 / elapsed / 1e9;
    // Own CPU (both threads), so the script can put the sender's cost next to the proxy's.
    let cpu = self_cpu_secs() - cpu0;
    println!("{{\"gbps\":{gbps:.3},\"frames\":{n},\"frame_bytes\":{},\"seconds\":{elapsed:.3},\"cpu_s\":{cpu:.4}}}", f.len());
    Ok(())
}

/// SEND_MESSAGE (code 10) the way the SDKs here send it: JSON header, v1 ext fields.
fn send_frame(opaque: i32, topic: &str, queue: u32, i: u64, body: &[u8]) -> Vec<u8> {
    // Brokers may order sends per (producer group, topic, queue): spread over a few groups.
    let lane = i % 16;
    let born = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let h = format!(
        r#"{{"code":10,"extFields":{{"producerGroup":"rmq_bench_pg{lane}","topic":"{topic}","defaultTopic":"TBW102","defaultTopicQueueNums":"4","queueId":"{queue}","sysFlag":"0","bornTimestamp":"{born}","flag":"0","properties":"KEYS\u0001k{i}\u0002TAGS\u0001TagA\u0002WAIT\u0001true\u0002","reconsumeTimes":"0","unitMode":"false","batch":"false"}},"flag":0,"language":"JAVA","opaque":{opaque},"serializeTypeCurrentRPC":"JSON","version":401}}"#
    );
    let mut out = Vec::with_capacity(8 + h.len() + body.len());
    out.extend_from_slice(&((4 + h.len() + body.len()) as i32).to_be_bytes());
    out.extend_from_slice(&(h.len() as i32).to_be_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(body);
    out
}

fn produce(to: SocketAddr, topic: &str, queues: u32, count: u64, body_bytes: usize, prefix: &str, window: u64) -> Result<()> {
    let s = connect(to)?;
    let mut w = s.try_clone()?;
    let answered = Arc::new(AtomicU64::new(0));
    let reader = {
        let answered = answered.clone();
        let mut r = BufReader::new(s);
        std::thread::spawn(move || -> Result<u64> {
            let mut scratch = Vec::new();
            let mut failed = 0;
            while answered.load(Ordering::Relaxed) < count {
                let (code, _, _) = read_frame(&mut r, &mut scratch)?;
                failed += u64::from(code != 0);
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(failed)
        })
    };
    let t0 = Instant::now();
    for i in 0..count {
        // Never more than `window` unanswered: the broker's own flow control stays out of it.
        while i >= answered.load(Ordering::Relaxed) + window {
            std::thread::sleep(Duration::from_micros(100));
        }
        let mut body = format!("{prefix} i={i} ").into_bytes();
        body.resize(body.len().max(body_bytes), b'x');
        w.write_all(&send_frame(i as i32, topic, (i % u64::from(queues.max(1))) as u32, i, &body))?;
    }
    let failed = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    println!("{{\"sent\":{count},\"failed\":{failed},\"seconds\":{secs:.3},\"per_s\":{:.0}}}", count as f64 / secs);
    if failed > 0 {
        bail!("{failed} of {count} sends failed");
    }
    Ok(())
}

fn latency(to: SocketAddr, count: usize) -> Result<()> {
    let mut s = connect(to)?;
    let mut r = BufReader::new(s.try_clone()?);
    let body = [b'p'; 64];
    let mut scratch = Vec::new();
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + 200 {
        let f = frame(ECHO, i as i32, 0, &body);
        let t = Instant::now();
        s.write_all(&f)?;
        let (_, opaque, _) = read_frame(&mut r, &mut scratch)?;
        if opaque != i as i32 {
            bail!("response opaque {opaque} for request {i}");
        }
        if i >= 200 {
            samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    println!("{{\"p50_us\":{:.1},\"p99_us\":{:.1},\"mean_us\":{mean:.1},\"count\":{count}}}", pct(0.50), pct(0.99));
    Ok(())
}

fn idle(to: SocketAddr, conns: usize, hold: f64) -> Result<()> {
    raise_nofile(conns as u64 * 2 + 256);
    let mut held = Vec::with_capacity(conns);
    let mut scratch = Vec::new();
    for i in 0..conns {
        let mut s = connect(to).with_context(|| format!("{i} connections open"))?;
        // One round trip per connection, so a proxy has built its upstream.
        s.write_all(&frame(ECHO, 1, 0, b"hi"))?;
        read_frame(&mut s, &mut scratch)?;
        held.push(s);
    }
    println!("idle ready {conns}");
    std::io::stdout().flush()?;
    // Hold until the script has read the proxy's RSS and sends SIGTERM, or
    // until --hold-secs, whichever comes first; exiting closes every socket.
    std::thread::sleep(Duration::from_secs_f64(hold));
    Ok(())
}

/// User + system CPU seconds of this process so far (all threads).
fn self_cpu_secs() -> f64 {
    // Safety: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft RLIMIT_NOFILE to `n` (capped by the hard limit, never lowered).
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // Safety: getrlimit/setrlimit only read or write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= n {
            return;
        }
        lim.rlim_cur = n.min(lim.rlim_max);
        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let all = |k: &str| args.windows(2).filter(|w| w[0] == k).map(|w| w[1].clone()).collect::<Vec<_>>();
    let to = || -> Result<SocketAddr> { get("--to").context("--to ADDR")?.parse().context("--to ADDR") };
    let num = |k: &str, d: f64| get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("peer") => peer(all("--listen").iter().map(|a| a.parse().context("--listen ADDR")).collect::<Result<_>>()?),
        Some("throughput") => throughput(to()?, num("--frame-bytes", 1048576.0) as usize, num("--seconds", 5.0), get("--rate-mbps").and_then(|v| v.parse().ok())),
        Some("latency") => latency(to()?, num("--count", 5000.0) as usize),
        Some("idle") => idle(to()?, num("--conns", 1000.0) as usize, num("--hold-secs", 5.0)),
        Some("produce") => produce(
            to()?,
            &get("--topic").context("--topic T")?,
            num("--queues", 4.0) as u32,
            num("--count", 10000.0) as u64,
            num("--body-bytes", 100.0) as usize,
            &get("--prefix").unwrap_or_else(|| "bench".into()),
            num("--window", 256.0) as u64,
        ),
        _ => bail!("usage: rmq-bench peer|throughput|latency|idle|produce (see the source header)"),
    }
}
