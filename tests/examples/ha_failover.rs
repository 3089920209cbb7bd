//! Fail-over of a highly available coordinator set (hack/bench-coordinator.sh runs it): an etcd
//! cluster of three members (hack/etcd.sh, cluster 3) and three coordinators on a one-node rig
//! (hack/rig.sh, rig 6, leader lease TTL seconds). Each round SIGKILLs the leader, then asks
//! for a new one-replica app at once (kitectl with every coordinator's address) and measures
//! kill → a new leader, and kill → the new app's pod placed on the node by the new leader; the
//! dead coordinator is started again (it stands by) before the next round.
//!
//!     cargo run --release -p kite-e2e --example ha_failover -- [ROUNDS [TTL]]

use std::time::{Duration, Instant};

use kite_e2e::agent::WEB_V1;
use kite_e2e::cluster::{web_app, Etcd, Rig};

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(5);
    let ttl = args.get(1).copied().unwrap_or(4);
    let etcd = Etcd::up(3, 3);
    let rig = Rig::up_ha(6, 1, &etcd, ttl);
    let c = &rig.coordinator;
    let dir = tempfile::tempdir().unwrap();
    let (mut to_leader, mut to_placed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let leader = rig.wait_leader(None, Duration::from_secs(60)).await;
        let name = format!("fo{round}");
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, web_app(&name, "runc", WEB_V1, 1, "")).unwrap();
        let killed = Instant::now();
        rig.run(&["coordinator-kill", &leader.to_string()]);
        let apply = {
            let address = c.address.clone();
            let pki = c.pki();
            let file = file.clone();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(kite_e2e::agent::KITECTL)
                    .args(["--coordinator", &address, "--credentials"])
                    .arg(&pki)
                    .args(["apply", "--no-wait", "-f"])
                    .arg(&file)
                    .output()
                    .unwrap()
            })
        };
        let next = rig.wait_leader(Some(leader), Duration::from_secs(60)).await;
        let elected = killed.elapsed().as_secs_f64();
        let out = apply.await.unwrap();
        assert!(
            out.status.success(),
            "apply after the fail-over: {}",
            kite_e2e::text(&out.stderr)
        );
        loop {
            if c.pods(&name).await.iter().any(|p| !p.node.is_empty()) {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "{name} never placed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let placed = killed.elapsed().as_secs_f64();
        println!(
            "round {round}: coordinator {leader} killed; coordinator {next} leads after {elected:.2} s, places {name} after {placed:.2} s"
        );
        to_leader.push(elected);
        to_placed.push(placed);
        rig.run(&["coordinator-up", &leader.to_string()]);
        c.kitectl_ok(&["delete", "deployment", &name]);
    }
    let (lm, llo, lhi) = median(to_leader);
    let (pm, plo, phi) = median(to_placed);
    println!();
    println!("| fail-over, lease TTL {ttl} s, {rounds} rounds | median [min–max] |");
    println!("|---|---|");
    println!("| leader SIGKILLed → another leads | {lm:.2} s [{llo:.2}–{lhi:.2}] |");
    println!("| leader SIGKILLed → a new app's pod placed by the new leader | {pm:.2} s [{plo:.2}–{phi:.2}] |");
    rig.down_clean();
    etcd.down();
}
