// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark reference: the cheapest TC program there is (the floor). */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int floor_prog(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

/* The same, as TCX programs: what attaching any program costs on a real
 * interface (flowmap-bench scale throughput). */
SEC("tcx/ingress")
int floor_in(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

SEC("tcx/egress")
int floor_out(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}
