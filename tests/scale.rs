//! Node-scale behaviour (not speed): overflow accounting with a small flow
//! map, interface churn without leaks, and the last veth's traffic counted.

use std::sync::Mutex;
use std::time::Duration;

use flowmap_bench::scale::{agent, generate, test_net};
use flowmap_testkit::agent::{flowmap_links, proc_fds, Agent};
use flowmap_testkit::net::{privileged_serial, sh, Link, Netns};

/// These tests share the 10.231.0.0/16 test network: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The agent as the load harness runs it, with a flow map of `max_flows`
/// entries, its flow records on stdout and no store.
fn start(iface: &str, interval: &str, max_flows: u32) -> Agent {
    agent(env!("CARGO_BIN_EXE_flowmap"), iface, interval)
        .option("max_flows", max_flows)
        .output("flows")
        .arg("--no-store")
        .start()
        .unwrap()
}

/// Sums the client→server packets of the UDP flow records from 10.231.2.1
/// to the services 8000..8009.
fn udp_packets(jsonl: &str) -> (u64, usize) {
    let mut packets = 0;
    let mut flows = std::collections::HashSet::new();
    for line in jsonl.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let dport = v["dst_port"].as_u64().unwrap();
        if v["protocol"] == "udp" && (8000..8010).contains(&dport) && v["src_ip"] == "10.231.2.1" {
            packets += v["src_to_dst"]["packets"].as_u64().unwrap();
            flows.insert((v["src_port"].as_u64().unwrap(), dport));
        }
    }
    (packets, flows.len())
}

fn agent_log_mentions_overflow(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("map_full=") && l.contains("packets not counted normally"))
}

#[test]
fn more_flows_than_the_map_holds_are_all_counted_or_counted_as_lost() {
    let Some(_g) = privileged_serial(
        "more_flows_than_the_map_holds_are_all_counted_or_counted_as_lost",
        &SERIAL,
    ) else {
        return;
    };
    let net = test_net(1).unwrap();
    let agent = start(&net.host, "2s", 1024);
    // 6000 flows (3000 IPv4 from 10.231.2.1, 3000 IPv6), 1 datagram each,
    // into a map of 1024 entries.
    let seen = agent.count_log("interval ");
    let conns = generate(&net, 6000, 0, 10, 0).unwrap();
    drop(conns);
    // Until an interval has drained what was sent.
    let t = std::time::Instant::now();
    while agent.count_log("interval ") < seen + 2 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let map_full = agent
        .metric("flowmap_kernel_events_total{reason=\"map_full\"} ")
        .unwrap();
    let lost = agent
        .metric("flowmap_kernel_events_total{reason=\"ring_lost\"} ")
        .unwrap();
    let out_log = agent.stderr();
    let (out, _) = agent.stop().unwrap();
    let (packets, flows) = udp_packets(&out);
    assert!(map_full > 0.0, "the map overflowed");
    assert!(
        agent_log_mentions_overflow(&out_log),
        "the overflow is in the log"
    );
    // Only the IPv4 half is summed here; ring losses are not split by
    // family, so they bound the IPv4 shortfall from above.
    assert!(packets <= 3000);
    assert!(
        3000 - packets <= lost as u64,
        "sent 3000, counted {packets}, lost {lost}"
    );
    if lost == 0.0 {
        assert_eq!(
            (packets, flows),
            (3000, 3000),
            "nothing lost: every packet counted once"
        );
    }
}

#[test]
fn interface_churn_leaks_nothing_and_the_last_veth_is_counted() {
    let Some(_g) = privileged_serial(
        "interface_churn_leaks_nothing_and_the_last_veth_is_counted",
        &SERIAL,
    ) else {
        return;
    };
    let agent = start("all", "30s", 32768);
    // Counted once the start's work is over: the process scan at start
    // (sock_diag socket, /proc directories) holds descriptors for a while.
    agent
        .wait_log("flowmap running", Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = agent.pid();
    let (fds0, links0) = (proc_fds(pid), flowmap_links());
    for _ in 0..19 {
        let link = Link::veth_pair().unwrap();
        let r = agent.wait_log(&format!("interface={} ", link.name), Duration::from_secs(5));
        drop(link);
        r.unwrap();
    }
    // The 20th: a namespace behind a veth, with traffic.
    let net = test_net(1).unwrap();
    agent
        .wait_log(&format!("interface={} ", net.host), Duration::from_secs(5))
        .unwrap();
    let conns = generate(&net, 20, 0, 10, 0).unwrap();
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    drop(net);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(proc_fds(pid), fds0, "file descriptors back to the start");
    assert_eq!(flowmap_links(), links0, "TCX links back to the start");
    let (out, _) = agent.stop().unwrap();
    assert_eq!(
        udp_packets(&out),
        (10, 10),
        "the last veth's 10 IPv4 datagrams"
    );
    assert_eq!(
        flowmap_links(),
        0,
        "nothing stays attached after the agent stops"
    );
}

/// A test network, the datapath loaded in this process (nothing attached),
/// and the network's host-end interface.
fn loaded() -> (
    Netns,
    flowmap::datapath::Datapath,
    flowmap::datapath::ifaces::Interface,
) {
    use flowmap::datapath::{ifaces, Datapath, Options};
    let net = test_net(0).unwrap();
    let dp = Datapath::load(&Options::default()).unwrap();
    let iface = ifaces::list()
        .unwrap()
        .into_iter()
        .find(|i| i.name == net.host)
        .unwrap();
    (net, dp, iface)
}

/// Moving an interface from classic filters to TCX while traffic flows
/// counts every packet exactly once.
#[test]
fn the_hand_over_from_classic_filters_to_tcx_counts_every_packet_once() {
    use flowmap::datapath::attach::HookKind;
    use flowmap_testkit::agent::tcx_programs;
    let Some(_g) = privileged_serial(
        "the_hand_over_from_classic_filters_to_tcx_counts_every_packet_once",
        &SERIAL,
    ) else {
        return;
    };
    let (net, mut dp, iface) = loaded();
    dp.attach_as(&iface, HookKind::Tc).unwrap();
    let tc = |dir: &str| sh(&["tc", "filter", "show", "dev", &net.host, dir]);
    assert!(tc("egress").contains("flowmap_eth_tc"));

    // 3000 datagrams of 100 bytes over about 1.5 s; the hand-over happens
    // in the middle.
    let sender = std::thread::spawn(|| {
        let u = std::net::UdpSocket::bind("10.231.0.1:0").unwrap();
        for _ in 0..3000 {
            u.send_to(&[5u8; 100], "10.231.0.2:9999").unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    std::thread::sleep(Duration::from_millis(400));
    assert!(dp.hand_over(iface.ifindex).unwrap());
    assert_eq!(dp.attached().next().unwrap().kind(), HookKind::Tcx);
    assert!(!tc("egress").contains("flowmap"), "the classic filter went");
    assert!(!tc("ingress").contains("flowmap"));
    let q = sh(&["tc", "qdisc", "show", "dev", &net.host]);
    assert!(
        !q.contains("clsact"),
        "the clsact qdisc made for the filters went:\n{q}"
    );
    assert!(tcx_programs(iface.ifindex)
        .iter()
        .any(|p| p == "flowmap_eth"));
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let d = dp.drain().unwrap();
    let (mut packets, mut bytes) = (0, 0);
    for (k, s) in &d.flows {
        if k.ifindex == iface.ifindex && k.conn.proto == 17 && k.conn.port.contains(&9999) {
            packets += s.packets[0] + s.packets[1];
            bytes += s.bytes[0] + s.bytes[1];
        }
    }
    assert_eq!((packets, bytes), (3000, 3000 * (14 + 20 + 8 + 100)));
    dp.detach_all();
    assert!(tcx_programs(iface.ifindex).is_empty());
}

/// flowmap removes the clsact qdisc it made, but never one that carries
/// someone else's filters.
#[test]
fn a_clsact_qdisc_with_other_filters_is_left_alone() {
    use flowmap::datapath::attach::HookKind;
    let Some(_g) = privileged_serial("a_clsact_qdisc_with_other_filters_is_left_alone", &SERIAL)
    else {
        return;
    };
    let (net, mut dp, iface) = loaded();
    let qdisc = || sh(&["tc", "qdisc", "show", "dev", &net.host]);
    dp.attach_as(&iface, HookKind::Tc).unwrap();
    assert!(qdisc().contains("clsact"));
    // Another tool adds its filter to the qdisc flowmap made.
    sh(&[
        "tc", "filter", "add", "dev", &net.host, "ingress", "prio", "1", "protocol", "all", "u32",
        "match", "u32", "0", "0", "classid", "1:1",
    ]);
    dp.detach_all();
    assert!(qdisc().contains("clsact"), "the other tool's qdisc stays");
    let f = sh(&["tc", "filter", "show", "dev", &net.host, "ingress"]);
    assert!(f.contains("u32") && !f.contains("flowmap"), "{f}");
    // Without it, flowmap's own qdisc goes with its filters.
    sh(&["tc", "qdisc", "del", "dev", &net.host, "clsact"]);
    dp.attach_as(&iface, HookKind::Tc).unwrap();
    dp.detach_all();
    assert!(!qdisc().contains("clsact"), "{}", qdisc());
}
