// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Benchmark reference: empty tp_btf programs on the tracepoints flowmap's
 * health programs use, so that `flowmap-bench scale health` can subtract
 * what the kernel's BPF statistics cost by themselves on each event. */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/tcp_retransmit_skb")
int floor_retransmit(__u64 *ctx)
{
	return 0;
}

SEC("tp_btf/tcp_retransmit_synack")
int floor_synack(__u64 *ctx)
{
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int floor_sock_state(__u64 *ctx)
{
	return 0;
}

SEC("tp_btf/tcp_probe")
int floor_rtt(__u64 *ctx)
{
	return 0;
}
