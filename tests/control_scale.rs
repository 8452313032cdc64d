//! Control-plane scale benchmark (ignored by default; it takes a minute):
//!
//! ```text
//! cargo test --release --test control_scale -- --ignored --nocapture control_scale_bench
//! TAILGATE_BENCH_NODES=2000 cargo test --release --test control_scale -- --ignored --nocapture control_scale_bench
//! ```
//!
//! The control server runs in a child process (this test binary re-run with
//! `TAILGATE_SCALE_SERVER_DIR` set) so its RSS can be read alone from
//! /proc; the simulated nodes are real protocol clients in this process, on
//! loopback TCP (HTTP upgrade, Noise IK, frames). Population: 1% `tag:prod`
//! servers, the rest user laptops, 10 per user; `group:admins` (10 users)
//! may log in to prod. The measured policy change adds 10 more users to
//! `group:admins`: their 100 nodes gain the prod servers as peers, the prod
//! servers gain them, every other node gets just the new policy.
//!
//! Printed: registration rate, server RSS (after registration and peak),
//! time for the policy change to reach every node (p50/p99/max), a single
//! node change fanned out to its viewers, bytes of full maps vs deltas.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tailgate::control::server::admin::execute;
use tailgate::control::server::hub::AdminRequest;
use tailgate::control::wire::proto::{MapFull, ServerMsg};
use tailgate::control::{AuthKeyToken, ControlClient, ControlServer, ControlTarget, NetMap, NodeHello, ServerOptions};
use tailgate::dataplane::wg;

fn bench_host_key() -> String {
    use russh::keys::ssh_key::public::{Ed25519PublicKey, KeyData};
    russh::keys::PublicKey::new(KeyData::Ed25519(Ed25519PublicKey([7; 32])), "").to_openssh().unwrap()
}

fn raise_nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

fn policy(admins: usize) -> String {
    let members: Vec<String> = (0..admins).map(|i| format!("\"u{i}\"")).collect();
    format!(
        r#"
[groups]
"group:admins" = [{}]

[tag_owners]
"tag:prod" = ["group:admins"]

[[ssh]]
src = ["group:admins"]
dst = ["tag:prod"]
users = ["root", "autogroup:nonroot"]
action = "accept"
record = true

[[ssh]]
src = ["autogroup:member"]
dst = ["autogroup:self"]
users = ["autogroup:nonroot"]
action = "accept"

[[tests]]
src = "u0"
dst = "tag:prod"
accept = ["root"]
"#,
        members.join(", ")
    )
}

/// The server side: runs only in the child process.
#[test]
#[ignore]
fn control_scale_server_process() {
    let Some(dir) = std::env::var_os("TAILGATE_SCALE_SERVER_DIR") else { return };
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let mut o = ServerOptions::new("127.0.0.1:0".parse().unwrap(), PathBuf::from(dir));
        o.keepalive = Duration::from_secs(60);
        o.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let s = ControlServer::start(o).await.unwrap();
        println!("TAILGATE_SCALE_READY {} {} {}", s.url(), wg::key_to_base64(&s.public_key()), s.metrics_addr().unwrap());
        std::io::stdout().flush().unwrap();
        // Run until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
        })
        .await
        .unwrap();
        s.shutdown().await;
    });
}

struct ServerChild {
    child: Child,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

async fn admin(dir: &Path, req: AdminRequest) -> serde_json::Value {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || execute(&dir, req)).await.unwrap().unwrap()
}

/// Size on the wire of a message: JSON + frame header + Noise tag + length.
fn wire_size(json_len: usize) -> usize {
    let frame = json_len + 5;
    frame + frame.div_ceil(65519) * (16 + 2)
}

fn full_map_size(m: &NetMap) -> usize {
    let full = MapFull {
        self_node: m.self_node.clone(),
        domain: m.domain.clone(),
        peers: m.peers.values().cloned().collect(),
        policy: m.policy.clone(),
    };
    wire_size(serde_json::to_vec(&ServerMsg::MapFull(full)).unwrap().len())
}

/// Server CPU time (user + system) in ms, from /proc.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name's closing parenthesis; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks * 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Scrapes /metrics 1000 times; returns (server CPU ms per scrape minus what
/// the server burns idle over the same wall time, body size).
async fn scrape_cost(pid: u32, addr: std::net::SocketAddr) -> (f64, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Many scrapes: /proc counts CPU in 10 ms ticks.
    const SCRAPES: u32 = 1000;
    let scrape = || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.unwrap();
        assert!(body.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&body));
        body.len()
    };
    let (c0, t0) = (cpu_ms(pid), std::time::Instant::now());
    let mut size = 0;
    for _ in 0..SCRAPES {
        size = scrape().await;
    }
    let (busy, wall) = (cpu_ms(pid) - c0, t0.elapsed());
    let c1 = cpu_ms(pid);
    tokio::time::sleep(wall.max(Duration::from_millis(200))).await;
    let idle = (cpu_ms(pid) - c1) * wall.as_secs_f64() / wall.max(Duration::from_millis(200)).as_secs_f64();
    (((busy - idle) / SCRAPES as f64).max(0.0), size)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn control_scale_bench() {
    let n: usize = std::env::var("TAILGATE_BENCH_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let nofile = raise_nofile();
    assert!(nofile as usize > n + 200, "RLIMIT_NOFILE {nofile} too low for {n} TCP clients");
    let prod_count = (n / 100).max(1);
    let per_user = 10;
    let users = (n - prod_count).div_ceil(per_user);
    println!("control_scale: {n} nodes ({prod_count} tag:prod, {users} users x {per_user}), loopback TCP, server in a child process");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "control_scale_server_process", "--nocapture", "--test-threads=1"])
        .env("TAILGATE_SCALE_SERVER_DIR", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let server = ServerChild { child };
    let (url, key, metrics) = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(line)) = lines.next() {
            // The harness may print "test ... " on the same line first.
            if let Some(at) = line.find("TAILGATE_SCALE_READY ") {
                let rest = &line[at + "TAILGATE_SCALE_READY ".len()..];
                let mut it = rest.split_whitespace();
                let found = (
                    it.next().unwrap().to_string(),
                    wg::key_from_base64(it.next().unwrap()).unwrap(),
                    it.next().unwrap().parse::<std::net::SocketAddr>().unwrap(),
                );
                // Keep draining the child's stdout so it never hits a closed pipe.
                std::thread::spawn(move || for _ in lines {});
                return found;
            }
        }
        panic!("server child exited before it was ready");
    })
    .await
    .unwrap();
    let target = ControlTarget { url: url.clone(), server_public: key, ca_pem: None };
    println!("  server pid {pid} at {url}, RSS at start {} MiB", rss_kib(pid, "VmRSS:") / 1024);

    // Users, policy, keys (admin socket).
    let t = Instant::now();
    admin(&dir, AdminRequest::PolicySet { text: policy(10), name: "bench.toml".into() }).await;
    let mut secrets = Vec::new();
    for u in 0..users {
        admin(&dir, AdminRequest::UsersAdd { name: format!("u{u}") }).await;
        let v = admin(
            &dir,
            AdminRequest::KeysCreate { user: Some(format!("u{u}")), reusable: true, ephemeral: false, expiry_secs: None, tags: vec![] },
        )
        .await;
        secrets.push(AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap().secret);
    }
    let v = admin(
        &dir,
        AdminRequest::KeysCreate {
            user: Some("u0".into()),
            reusable: true,
            ephemeral: false,
            expiry_secs: None,
            tags: vec!["tag:prod".into()],
        },
    )
    .await;
    let prod_secret = AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap().secret;
    println!("  admin: {users} users + keys in {:.2?}", t.elapsed());

    // Registration: all nodes, 64 at a time.
    let target2 = target.clone();
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = Vec::new();
    for i in 0..n {
        let (secret, host) = if i < prod_count {
            (prod_secret.clone(), format!("prod{i}"))
        } else {
            let j = i - prod_count;
            (secrets[j / per_user].clone(), format!("u{}-dev{}", j / per_user, j % per_user))
        };
        let target = target2.clone();
        let sem = sem.clone();
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let key = wg::generate_private_key();
            let hello = NodeHello {
                auth_key: Some(secret),
                hostname: host,
                ssh_host_key: Some(bench_host_key()),
                endpoints: vec!["198.51.100.7:41641".parse().unwrap(), "[2a01:4f8::7]:41641".parse().unwrap()],
                ..Default::default()
            };
            ControlClient::connect(&target, &key, hello).await.unwrap()
        }));
    }
    let mut clients = Vec::with_capacity(n);
    for j in joins {
        clients.push(j.await.unwrap());
    }
    let reg = t.elapsed();
    println!("  registration: {n} nodes in {reg:.2?} = {:.0} nodes/s", n as f64 / reg.as_secs_f64());
    let rss_reg = rss_kib(pid, "VmRSS:");
    println!("  server RSS after registration: {} MiB", rss_reg / 1024);

    // Followers: apply every delta; report when the new policy arrived.
    let v1 = admin(&dir, AdminRequest::PolicyGet).await["version"].as_u64().unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant, usize, usize)>();
    let bytes_other = Arc::new(AtomicU64::new(0));
    let deltas_other = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let (report_tx, report_rx) = tokio::sync::watch::channel(false);
    let (size_tx, mut size_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, usize, usize)>();
    for (i, (mut c, _)) in clients.into_iter().enumerate() {
        let done_tx = done_tx.clone();
        let size_tx = size_tx.clone();
        let mut report_rx = report_rx.clone();
        let (bo, dn) = (bytes_other.clone(), deltas_other.clone());
        handles.push(tokio::spawn(async move {
            let mut reported = false;
            loop {
                let d = tokio::select! {
                    d = c.next_update() => d,
                    _ = report_rx.changed() => {
                        let _ = size_tx.send((i, full_map_size(c.netmap()), c.netmap().peers.len()));
                        continue;
                    }
                };
                let Ok(d) = d else { return };
                let size = wire_size(serde_json::to_vec(&ServerMsg::MapDelta(d.clone())).unwrap().len());
                if !reported && c.netmap().policy.version > v1 {
                    reported = true;
                    let _ = done_tx.send((i, Instant::now(), size, c.netmap().peers.len()));
                } else {
                    bo.fetch_add(size as u64, Ordering::Relaxed);
                    dn.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Let registration deltas settle.
    let mut last = u64::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = deltas_other.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let settle_deltas = deltas_other.load(Ordering::Relaxed);
    let settle_bytes = bytes_other.load(Ordering::Relaxed);

    // The measured policy change.
    let t0 = Instant::now();
    admin(&dir, AdminRequest::PolicySet { text: policy(20), name: "bench.toml".into() }).await;
    let set_done = t0.elapsed();
    let mut lat = Vec::with_capacity(n);
    // Per category: prod server, old admin, new admin, ordinary user node.
    let category = |i: usize| {
        if i < prod_count {
            0
        } else {
            match (i - prod_count) / per_user {
                0..10 => 1,
                10..20 => 2,
                _ => 3,
            }
        }
    };
    let mut delta_bytes: [Vec<usize>; 4] = Default::default();
    let mut admin_peers = Vec::new();
    while lat.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some((i, at, size, peers))) => {
                lat.push(at - t0);
                delta_bytes[category(i)].push(size);
                if category(i) == 2 {
                    admin_peers.push(peers);
                }
            }
            _ => panic!("only {} of {n} nodes got the policy change within 60 s", lat.len()),
        }
    }
    let max = *lat.iter().max().unwrap();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    let rss_after = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    assert!(admin_peers.iter().all(|p| *p >= prod_count), "new admins see every prod server");

    // One node change (a prod server renamed): reaches the nodes that see it.
    let before = deltas_other.load(Ordering::Relaxed);
    let t1 = Instant::now();
    admin(&dir, AdminRequest::NodesRename { node: "prod0".into(), name: "prod0-renamed".into() }).await;
    // The admins' nodes see it; prod0 itself gets its new name.
    let viewers = (20 * per_user).min(n - prod_count) + 1;
    let mut waited = Duration::ZERO;
    while deltas_other.load(Ordering::Relaxed) < before + viewers as u64 && waited < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited = t1.elapsed();
    }
    let rename = t1.elapsed();
    let rename_deltas = deltas_other.load(Ordering::Relaxed) - before;

    let avg = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    // Full maps as they are now (what a reconnecting node would get).
    report_tx.send(true).unwrap();
    let mut full_now: [Vec<usize>; 4] = Default::default();
    let mut peers_now: [Vec<usize>; 4] = Default::default();
    for _ in 0..n {
        let (i, size, peers) = tokio::time::timeout(Duration::from_secs(30), size_rx.recv()).await.unwrap().unwrap();
        full_now[category(i)].push(size);
        peers_now[category(i)].push(peers);
    }
    println!(
        "  policy change (admin command -> every node has it): max {max:.2?}, p50 {p50:.2?}, p99 {p99:.2?} (admin call returned after {set_done:.2?})"
    );
    println!("  single node change (rename) -> {rename_deltas} deltas to its {viewers} viewers in {rename:.2?}");
    println!("  server RSS: {} MiB after the policy change, peak {} MiB", rss_after / 1024, hwm / 1024);
    println!("  bytes on the wire (JSON + frame + Noise), averages:");
    for (c, label) in ["tag:prod server", "admin's node", "new admin's node", "other user's node"].iter().enumerate() {
        println!(
            "    {label:<18} {:>5.0} peers: full map {:>7.0} B, policy-change delta {:>6.0} B",
            avg(&peers_now[c]),
            avg(&full_now[c]),
            avg(&delta_bytes[c])
        );
    }
    println!(
        "    registration/online deltas {:.0} B; the policy text itself is {} B",
        settle_bytes as f64 / settle_deltas.max(1) as f64,
        policy(20).len()
    );
    println!(
        "CONTROL_SCALE nodes={n} reg_per_s={:.0} policy_max_ms={} policy_p99_ms={} rss_mib={} peak_mib={}",
        n as f64 / reg.as_secs_f64(),
        max.as_millis(),
        p99.as_millis(),
        rss_after / 1024,
        hwm / 1024
    );
    let (scrape_ms, scrape_bytes) = scrape_cost(pid, metrics).await;
    println!("  /metrics with {n} nodes online: {scrape_ms:.2} ms server CPU per scrape (idle CPU subtracted), {scrape_bytes} B");
    println!("CONTROL_SCALE_METRICS nodes={n} cpu_ms_per_scrape={scrape_ms:.2} bytes={scrape_bytes}");
    for h in handles {
        h.abort();
    }
    drop(server);
    if n >= 10_000 {
        assert!(max < Duration::from_secs(2), "policy change took {max:?} (goal < 2 s)");
        assert!(hwm / 1024 < 500, "server peak RSS {} MiB (goal < 500 MiB)", hwm / 1024);
    }
}
