/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Structures shared between the kernel program and flowmap's user space.
 * They are defined only here; the Rust side uses the skeleton's generated
 * mirror (libbpf-cargo) and a test checks the layout.
 */
#ifndef FLOWMAP_FLOWS_H
#define FLOWMAP_FLOWS_H

#include <linux/types.h>

/* A flow as one interface sees it, in both directions. The two endpoints
 * are stored in a fixed canonical order (side_of() in flows.bpf.c),
 * so a reply packet lands in the same entry as its request. IPv4
 * addresses are stored IPv4-mapped (::ffff:a.b.c.d). */
struct flow_key {
	__u8 addr[2][16];
	__u32 ifindex;
	__u16 port[2];  /* host byte order; 0 for protocols without ports */
	__u8 proto;     /* IP protocol number */
	__u8 family;    /* 4 or 6 */
	__u8 pad[2];
};

/* An IPv4 flow on one interface: struct flow_key in 16 bytes, in the same
 * canonical order (the lookup's hash and compare cover 16 bytes, not 44).
 * IPv4 flows on interfaces whose index is below FLOW_KEY4_IFINDEX_MAX use
 * this key and the flows4 maps; every other flow uses struct flow_key. */
struct flow_key4 {
	__u8 addr[2][4];    /* as in the packet */
	__u16 port[2];      /* host byte order; 0 for protocols without ports */
	__u32 ifindex_proto; /* ifindex << 8 | IP protocol number */
};

#define FLOW_KEY4_IFINDEX_MAX (1u << 24)

/* Counters of one flow for one drain period. The program only ever adds to
 * them (atomically) or sets a field that is still zero. */
struct flow_stats {
	__u64 packets[2];   /* sent by side 0 / side 1 */
	__u64 bytes[2];     /* skb->len: the frame length a capture reports */
	__u64 first_seen_ns;      /* CLOCK_MONOTONIC, when this entry was created */
	__u64 first_seen_jiffies; /* the kernel tick at that moment ... */
	__u64 last_seen_jiffies;  /* ... and at the last packet (a tick is cheap to
	                           * read; user space turns it into time) */
	__u64 syn_ns;       /* first TCP SYN without ACK */
	__u64 synack_ns;    /* first TCP SYN+ACK */
	__u32 tcp_flags[2]; /* OR of the TCP flags each side sent */
	__u8 open_side;     /* 0 unknown, 1: side 0 opened (SYN / echo request), 2: side 1 */
	__u8 first_side;    /* 1 or 2: the side whose packet created this entry */
	__u8 pad[2];
	/* Health, off the path of established packets: */
	__u32 syns;         /* TCP SYNs without ACK (the first and retransmits) */
	__u32 unreach;      /* ICMP/ICMPv6 destination unreachable quoting this flow */
	__u32 unreach_side; /* 1 or 2: the side whose packet the ICMP error quoted */
};

/* One slot of the per-CPU flow cache (flows.bpf.c, cache_a / cache_b):
 * the counts one CPU added for an IPv4 flow since the slot was filled, not
 * yet in the flow's entry of the flows4 map. A slot is filled only for a
 * flow whose entry exists in the same period's map, and only after its
 * first CACHE_YOUNG packets; user space adds the slots of the old period to
 * the drained entries and zeroes them. 64 bytes: one cache line. */
struct flow_slot {
	struct flow_key4 key; /* all zero: an empty slot */
	__u64 packets[2];
	__u64 bytes[2];
	__u64 last_seen_jiffies;
	__u8 tcp_flags[2];
	__u8 young[2];   /* 1: this side's packets still go to the entry */
	__u32 pad;
};

#define CACHE_ELEMS 4       /* per-CPU array elements of one cache */
#define CACHE_PER_ELEM 128  /* slots in one element (8 KB) */

struct flow_slots {
	struct flow_slot s[CACHE_PER_ELEM];
};

/* A connection whatever interface carries it: the flow key without the
 * interface, in the same canonical order. Keys the health maps, which
 * socket tracepoints fill (they know no interface). */
struct conn_key {
	__u8 addr[2][16];
	__u16 port[2];
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

/* What socket tracepoints saw of one connection in one drain period. */
struct conn_health {
	__u64 retrans[2]; /* segments sent again by side 0 / side 1 (TcpRetransSegs) */
};

/* A kernel drop (skb:kfree_skb) in one drain period: the connection of
 * the dropped packet in canonical order when its IPv4/IPv6 and TCP/UDP
 * headers parse, else all zero (family 0: counted by reason alone). */
struct drop_key {
	struct conn_key conn;
	__u32 reason;     /* enum skb_drop_reason of the running kernel */
};

/* Smoothed RTT of a TCP connection, sampled from each local socket when it
 * leaves ESTABLISHED, in microseconds (tcp_sock.srtt_us >> 3); 0: none. */
struct conn_rtt {
	__u32 srtt_us[2]; /* the socket of side 0 / side 1 of the conn_key */
};

/* Sent through the overflow ring buffer for a packet whose flow could not
 * be stored because the flow map was full. */
struct flow_event {
	struct flow_key key;
	__u32 side;       /* 0 or 1: which side sent the packet */
	__u64 bytes;
	__u64 ts_ns;       /* CLOCK_MONOTONIC */
	__u64 jiffies;
	__u32 tcp_flags;
	__u8 opens;        /* the packet opens a connection (SYN, echo request) */
	__u8 synack;
	__u8 pad[2];
};

/* Indexes of the per-CPU statistics array. */
enum flow_stat {
	STAT_NON_IP = 0,             /* ARP, LLDP, ...: not a flow, not an error */
	STAT_TRUNCATED,          /* a header ends before its stated length */
	STAT_BAD_HEADER,         /* impossible header length or version */
	STAT_EXT_CHAIN_TOO_LONG, /* more IPv6 extension headers than we follow */
	STAT_FRAG_NO_HEAD,       /* non-first fragment whose first was not seen */
	STAT_MAP_FULL,           /* flow map full: handed to the ring buffer */
	STAT_RING_LOST,          /* ... and the ring buffer was full too: lost */
	STAT_NAMES_LIMITED,      /* a DNS answer or ClientHello over the per-CPU rate: not captured */
	STAT_NAMES_LOST,         /* ... captured, but the names ring buffer was full */
	STAT_DROPS_LOST,         /* a kernel drop not counted: the drops map was full */
	STAT_SRTT_LOST,          /* a smoothed RTT sample not kept: the srtt map was full */
	STAT_PROCS_LOST,         /* a connection's process not handed over: the procs ring was full */
	STAT_MAX,
};

/* Written by the flowmap_clock program: one reading of both clocks, so
 * user space can convert ticks to CLOCK_MONOTONIC. */
struct clock_sample {
	__u64 ns;
	__u64 jiffies;
};

/* Names of peers (issue 14, bpf/names.bpf.h): what the program hands user
 * space so it can name the ends of a connection. Only these packets, and
 * only their first bytes, ever leave the kernel. */
enum name_kind {
	NAME_DNS_UDP = 1, /* a UDP datagram from port 53 (a DNS answer) */
	NAME_DNS_TCP = 2, /* a TCP segment from port 53 */
	NAME_TLS = 3,     /* a client's segment of a TLS ClientHello */
	NAME_HTTP = 4,    /* the first segment of a plain HTTP request */
	NAME_QUIC = 5,    /* a client's QUIC Initial datagram (UDP to 443) */
};

#define NAME_DNS_CAP 512  /* bytes of a DNS message captured */
#define NAME_TLS_CAP 2048 /* bytes of one ClientHello segment captured */
#define NAME_HTTP_CAP 1024 /* bytes of an HTTP request's head captured */

/* Header of a record of the `names` ring buffer; `len` payload bytes
 * follow it. */
struct name_event {
	__u8 addr[2][16]; /* [0] the sender, [1] the receiver (IPv4-mapped) */
	__u32 ifindex;
	__u16 port[2];    /* host byte order */
	__u32 seq;        /* TCP: sequence number of the first captured byte */
	__u16 len;        /* payload bytes captured (after this header) */
	__u8 kind;        /* enum name_kind */
	__u8 family;      /* 4 or 6 */
};

#endif
