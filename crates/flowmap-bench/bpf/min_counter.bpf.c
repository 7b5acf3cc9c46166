// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark reference: a minimal per-CPU packet/byte counter keyed by the
 * IPv4 (source, destination) pair, with direct packet access. It parses
 * only untagged Ethernet + IPv4; this is the least a flow counter can do. */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct pair {
	__be32 src;
	__be32 dst;
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pair);
	__type(value, struct counter);
} counters SEC(".maps");

SEC("tc")
int min_counter(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_UNSPEC;
	struct pair k = { .src = ip->saddr, .dst = ip->daddr };
	struct counter *c = bpf_map_lookup_elem(&counters, &k);
	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	} else {
		struct counter n = { .packets = 1, .bytes = skb->len };
		bpf_map_update_elem(&counters, &k, &n, BPF_NOEXIST);
	}
	return TC_ACT_UNSPEC;
}
