//! SSH-layer microbenchmark over loopback TCP (no WireGuard): bulk output
//! throughput and login latency with stock OpenSSH, to see what the SSH
//! server itself costs. Run in release mode:
//!   cargo test --release --test ssh_bench -- --ignored --nocapture

#[path = "common/ssh_harness.rs"]
mod ssh_harness;

use std::process::Command;
use std::time::{Duration, Instant};

use ssh_harness::*;

#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn bench_ssh_layer_over_loopback() {
    let s = TestServer::start(&format!(
        r#"{POLICY_HEAD}
[[ssh]]
src = ["alice@example.com"]
dst = ["tag:test"]
users = ["root"]
action = "accept"
"#
    ));
    let mb: u64 = std::env::var("TG_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    let ssh = format!("ssh {} root@127.0.0.1", ssh_opts(s.port).join(" "));
    let t0 = Instant::now();
    let o = run(Command::new("sh").arg("-c").arg(format!("{ssh} 'head -c {mb}M /dev/zero' | wc -c")), b"", Duration::from_secs(300));
    let dt = t0.elapsed();
    assert_eq!(o.out().trim(), (mb << 20).to_string(), "{o:?}");
    println!("throughput: {mb} MiB in {:.2} s = {:.1} MiB/s", dt.as_secs_f64(), mb as f64 / dt.as_secs_f64());

    let n = 20;
    let t0 = Instant::now();
    let mut each = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        assert_eq!(run(s.ssh("root").arg("true"), b"", Duration::from_secs(30)).code(), 0);
        each.push(t.elapsed().as_millis());
    }
    println!("per login (ms): {each:?}");
    println!("login: {n}x ssh true in {:.2} s = {:.0} ms each", t0.elapsed().as_secs_f64(), t0.elapsed().as_secs_f64() * 1000.0 / n as f64);
}
