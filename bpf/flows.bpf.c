// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * flowmap's kernel program: one parser, attached at TC ingress and egress.
 *
 * It counts every packet into a flow entry and never drops or modifies a
 * packet: every entry point returns TC_ACT_UNSPEC (TCX_NEXT), so the next
 * program on the hook (Cilium, Calico, ...) still runs.
 *
 * Flow entries go into one of two hash maps (flows_a / flows_b); user space
 * flips `active_map`, waits for an RCU grace period, and then drains the map
 * that no program writes any more. No count that arrives during a drain is
 * lost.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "flows.h"

#define MAX_IPV6_EXT 8   /* extension headers followed before giving up */
#define MAX_VLAN_TAGS 2  /* 802.1ad outer + 802.1Q inner */
#define DIRECT_MAX_OFF 4096
#define PARSE_OK STAT_MAX /* not a statistics index */

#ifndef ETH_P_8021AD
#define ETH_P_8021AD 0x88A8
#endif

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768); /* set by user space before load */
	__type(key, struct flow_key);
	__type(value, struct flow_stats);
} flows_a SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__type(key, struct flow_key);
	__type(value, struct flow_stats);
} flows_b SEC(".maps");

/* IPv4 flows (struct flow_key4), swapped with flows_a / flows_b. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768); /* set by user space before load */
	__type(key, struct flow_key4);
	__type(value, struct flow_stats);
} flows4_a SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__type(key, struct flow_key4);
	__type(value, struct flow_stats);
} flows4_b SEC(".maps");

/* The per-CPU flow cache in front of the flows4 maps, swapped with them:
 * established packets of a busy IPv4 flow add to their CPU's slot with
 * plain adds and never touch the shared map (see account4()). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CACHE_ELEMS);
	__type(key, __u32);
	__type(value, struct flow_slots);
} cache_a SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CACHE_ELEMS);
	__type(key, __u32);
	__type(value, struct flow_slots);
} cache_b SEC(".maps");

/* Ports of the first fragment of a fragmented datagram, so the later
 * fragments (which carry no L4 header) count into the same flow. */
struct frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_ports {
	__u16 sport;
	__u16 dport;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
} frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Overflow path: packets whose flow did not fit in the map. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} overflow SEC(".maps");

/* Health of connections from socket tracepoints, swapped with the flow
 * maps (the same active_map). Only connections that retransmitted in the
 * drain period have an entry; when full, later ones are not counted. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct conn_key);
	__type(value, struct conn_health);
} health_a SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct conn_key);
	__type(value, struct conn_health);
} health_b SEC(".maps");

/* Which flow map the program writes: 0 = flows_a, 1 = flows_b. */
volatile __u32 active_map = 0;

/* Referenced so that the skeleton generates their Rust mirror. */
struct flow_key flow_key_layout = {};
struct flow_key4 flow_key4_layout = {};
struct flow_stats flow_stats_layout = {};
struct flow_slot flow_slot_layout = {};
struct flow_event flow_event_layout = {};
struct conn_key conn_key_layout = {};
struct conn_health conn_health_layout = {};
struct drop_key drop_key_layout = {};
struct conn_rtt conn_rtt_layout = {};
enum flow_stat flow_stat_layout = STAT_NON_IP;

/* The clock reading of flowmap_clock. */
struct clock_sample clock = {};

struct pkt {
	/* Filled in packet order (addr[0]/port[0] = sender); account() puts it
	 * in canonical order and uses it as the map key, without a copy. */
	struct flow_key k;
	__u8 tcp_flags;
	__u8 opens;  /* this packet opens a connection (SYN, echo request) */
	__u8 synack;
	__u32 l4_off; /* where the L4 header starts (0: not parsed, a later fragment) */
	__u32 l3_end; /* where the IP packet ends (link-layer padding excluded) */
};

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += n;
}

static __always_inline void stat_inc(__u32 idx)
{
	stat_add(idx, 1);
}

/* Copy len bytes at off into to: directly from the linear part when the
 * bytes are there, through the helper otherwise (non-linear skbs).
 * Returns 0 on success, negative when the packet is too short. */
static __always_inline int load(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	if (off <= DIRECT_MAX_OFF) {
		void *data = (void *)(long)skb->data;
		void *end = (void *)(long)skb->data_end;
		void *p = data + off;
		if (p + len <= end) {
			__builtin_memcpy(to, p, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

/* Like load(), but returns a pointer into the packet when the bytes are in
 * the linear part (no copy), or to buf filled by the helper otherwise;
 * NULL when the packet is too short. */
static __always_inline __u8 *hdr(struct __sk_buff *skb, __u32 off, __u8 *buf, __u32 len)
{
	if (off <= DIRECT_MAX_OFF) {
		__u8 *data = (void *)(long)skb->data;
		__u8 *end = (void *)(long)skb->data_end;
		__u8 *p = data + off;
		if (p + len <= end)
			return p;
	}
	if (bpf_skb_load_bytes(skb, off, buf, len))
		return 0;
	return buf;
}

/* ::ffff:a.b.c.d as two 8-byte stores. */
static __always_inline void set_v4mapped(__u8 *dst, __be32 a)
{
	__u64 lo = 0, hi;
	__u8 w[8] = { 0, 0, 0xff, 0xff };
	__builtin_memcpy(w + 4, &a, 4);
	__builtin_memcpy(&hi, w, 8);
	__builtin_memcpy(dst, &lo, 8);
	__builtin_memcpy(dst + 8, &hi, 8);
}

/* Compare (a, pa) with (b, pb); returns 1 when the first is greater. */
static __always_inline int side_of(const __u8 *a, __u16 pa, const __u8 *b, __u16 pb)
{
	__u64 a0, a1, b0, b1;
	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	if (a0 != b0)
		return a0 > b0;
	if (a1 != b1)
		return a1 > b1;
	return pa > pb;
}

/* Puts the key in canonical order (the greater endpoint second) and sets
 * the interface; returns the side that sent the packet. */
static __always_inline __u32 canonical(struct __sk_buff *skb, struct flow_key *kp)
{
	__u32 side = side_of(kp->addr[0], kp->port[0], kp->addr[1], kp->port[1]);
	if (side) {
		__u64 t[2], u[2];
		__builtin_memcpy(t, kp->addr[0], 16);
		__builtin_memcpy(u, kp->addr[1], 16);
		__builtin_memcpy(kp->addr[0], u, 16);
		__builtin_memcpy(kp->addr[1], t, 16);
		__u16 port = kp->port[0];
		kp->port[0] = kp->port[1];
		kp->port[1] = port;
	}
	kp->ifindex = skb->ifindex;
	kp->pad[0] = 0;
	kp->pad[1] = 0;
	return side;
}

/* When the packet was seen: the tick on every packet (one load), the clock
 * (a helper call that costs more than the rest of the lookup) only on
 * handshake packets and when an entry is created. */
struct when {
	__u64 jiffies;
	__u64 precise; /* 0 unless the packet opens or answers a handshake */
	__u64 len;
};

/* The map was full: hand the packet to user space through the ring
 * buffer, and count it (and count it lost when the ring is full too). */
static __always_inline void overflow_packet(struct pkt *p, __u32 side, struct when *w)
{
	stat_inc(STAT_MAP_FULL);
	struct flow_event *e = bpf_ringbuf_reserve(&overflow, sizeof(*e), 0);
	if (!e) {
		stat_inc(STAT_RING_LOST);
		return;
	}
	__builtin_memcpy(&e->key, &p->k, sizeof(p->k));
	e->side = side;
	e->bytes = w->len;
	e->ts_ns = w->precise ? w->precise : bpf_ktime_get_ns();
	e->jiffies = w->jiffies;
	e->tcp_flags = p->tcp_flags;
	e->opens = p->opens;
	e->synack = p->synack;
	e->pad[0] = 0;
	e->pad[1] = 0;
	bpf_ringbuf_submit(e, 0);
}

/* Creates the entry of a flow not in the map (under key, p->k's or its
 * IPv4 form). Returns the entry to add to when another CPU created it
 * meanwhile, NULL when done (created, or handed to the overflow path). */
static __always_inline struct flow_stats *create(void *map, void *key, struct pkt *p,
						 __u32 side, struct when *w)
{
	struct flow_stats nv;
	__builtin_memset(&nv, 0, sizeof(nv));
	if (side) {
		nv.packets[1] = 1;
		nv.bytes[1] = w->len;
		nv.tcp_flags[1] = p->tcp_flags;
	} else {
		nv.packets[0] = 1;
		nv.bytes[0] = w->len;
		nv.tcp_flags[0] = p->tcp_flags;
	}
	nv.first_seen_ns = w->precise ? w->precise : bpf_ktime_get_ns();
	nv.first_seen_jiffies = w->jiffies;
	nv.last_seen_jiffies = w->jiffies;
	nv.first_side = side + 1;
	if (p->opens) {
		nv.open_side = side + 1;
		if (p->k.proto == IPPROTO_TCP) {
			nv.syn_ns = w->precise;
			nv.syns = 1;
		}
	}
	if (p->synack)
		nv.synack_ns = w->precise;
	long err = bpf_map_update_elem(map, key, &nv, BPF_NOEXIST);
	if (err == 0)
		return 0;
	struct flow_stats *v = 0;
	if (err == -17 /* EEXIST: created by another CPU meanwhile */)
		v = bpf_map_lookup_elem(map, key);
	if (!v)
		overflow_packet(p, side, w);
	return v;
}

/* Adds the packet to an existing entry; the sender's packets in it,
 * this one included (the atomic add returns it at no cost). */
static __always_inline __u64 add(struct flow_stats *v, struct pkt *p, __u32 side, struct when *w)
{
	__u64 sent;
	/* Separate branches: the verifier rejects the OR-indexing clang
	 * would otherwise emit for [side]. */
	if (side) {
		sent = __sync_fetch_and_add(&v->packets[1], 1) + 1;
		__sync_fetch_and_add(&v->bytes[1], w->len);
		if (p->tcp_flags && (v->tcp_flags[1] & p->tcp_flags) != p->tcp_flags)
			__sync_fetch_and_or(&v->tcp_flags[1], (__u32)p->tcp_flags);
	} else {
		sent = __sync_fetch_and_add(&v->packets[0], 1) + 1;
		__sync_fetch_and_add(&v->bytes[0], w->len);
		if (p->tcp_flags && (v->tcp_flags[0] & p->tcp_flags) != p->tcp_flags)
			__sync_fetch_and_or(&v->tcp_flags[0], (__u32)p->tcp_flags);
	}
	if (v->last_seen_jiffies < w->jiffies)
		v->last_seen_jiffies = w->jiffies;
	/* Handshake packets only: established traffic takes one branch. */
	if (p->opens) {
		if (p->k.proto == IPPROTO_TCP)
			__sync_fetch_and_add(&v->syns, 1);
		if (!v->open_side) {
			v->open_side = side + 1;
			if (p->k.proto == IPPROTO_TCP && !v->syn_ns)
				v->syn_ns = w->precise;
		}
	}
	if (p->synack && !v->synack_ns)
		v->synack_ns = w->precise;
	return sent;
}

#include "names.bpf.h"

/* The IPv4 key of a flow whose struct flow_key is in canonical order. */
static __always_inline void key4_of(struct flow_key4 *k4, const struct flow_key *k)
{
	__builtin_memcpy(k4->addr[0], k->addr[0] + 12, 4);
	__builtin_memcpy(k4->addr[1], k->addr[1] + 12, 4);
	k4->port[0] = k->port[0];
	k4->port[1] = k->port[1];
	k4->ifindex_proto = (k->ifindex << 8) | k->proto;
}

/* Whether a flow (its key in canonical order) goes to the flows4 maps. */
static __always_inline int is_flow4(const struct flow_key *k)
{
	return k->family == 4 && k->ifindex < FLOW_KEY4_IFINDEX_MAX;
}

/* Counts the packet into its flow's entry, creating it when missing.
 * Returns the entry (NULL when the packet went to the overflow path) and
 * sets *sent to the sender's packets in it, this one included. */
static __always_inline struct flow_stats *account(struct __sk_buff *skb, struct pkt *p, void *map,
						  void *key, __u32 side, __u64 jiffies,
						  __u64 *sent)
{
	struct when w = {
		.jiffies = jiffies,
		.precise = (p->opens || p->synack) ? bpf_ktime_get_ns() : 0,
		.len = skb->len,
	};
	struct flow_stats *v = bpf_map_lookup_elem(map, key);
	if (!v)
		v = create(map, key, p, side, &w);
	*sent = 1;
	if (v)
		*sent = add(v, p, side, &w);
	names_packet(skb, p, side, v, *sent);
	return v;
}

/* The per-CPU flow cache (cache_a / cache_b, struct flow_slot).
 *
 * On real packets the shared hash map's lookup costs most of the program
 * (the bucket and the element miss the CPU's caches between packets). A
 * flow whose entry has seen CACHE_YOUNG packets from a side has that
 * side's later packets counted in a direct-mapped slot of the CPU's own
 * cache instead: one array element, a 16-byte compare and plain adds.
 * Handshake packets (SYN, SYN+ACK, echo request) always go to the entry,
 * and so do a side's first CACHE_YOUNG packets, which the name capture
 * looks at; with capture on, flows of port 53 never use the cache.
 *
 * A slot is filled only when its flow's entry is in the same period's map
 * (the cache is swapped with it), so the counts of a slot always have an
 * entry to go to: at eviction (flush_slot) or at the drain, where user
 * space adds the old period's slots of every CPU to the drained entries.
 * A slot is taken by another flow only when its flow has been idle for
 * CACHE_IDLE ticks (32–320 ms): with more busy flows than slots, most
 * packets would otherwise evict another flow (a second map update each),
 * and this way a slot changes hands at most once per CACHE_IDLE ticks.
 *
 * Plain adds are safe: a CPU runs one TC program at a time (ingress runs
 * in softirq, egress with bottom halves off). */
#define CACHE_YOUNG 8
#define CACHE_IDLE 32 /* ticks a slot's flow must be idle before another takes the slot */

/* The slot of a flow: 9 bits of a multiplicative hash of its key. */
static __always_inline __u32 slot_index(const struct flow_key4 *k)
{
	__u64 a, b;
	__builtin_memcpy(&a, k, 8);
	__builtin_memcpy(&b, (const __u8 *)k + 8, 8);
	__u64 h = (a ^ (b * 0x9e3779b97f4a7c15ULL)) * 0xc2b2ae3d27d4eb4fULL;
	return h >> 55; /* CACHE_ELEMS * CACHE_PER_ELEM slots */
}

static __always_inline struct flow_slot *slot_at(void *cache, __u32 i)
{
	__u32 elem = (i >> 7) & (CACHE_ELEMS - 1);
	struct flow_slots *ss = bpf_map_lookup_elem(cache, &elem);
	if (!ss)
		return 0;
	return &ss->s[i & (CACHE_PER_ELEM - 1)];
}

static __always_inline int slot_holds(const struct flow_slot *s, const struct flow_key4 *k)
{
	__u64 a, b, c, d;
	__builtin_memcpy(&a, &s->key, 8);
	__builtin_memcpy(&b, (const __u8 *)&s->key + 8, 8);
	__builtin_memcpy(&c, k, 8);
	__builtin_memcpy(&d, (const __u8 *)k + 8, 8);
	return a == c && b == d;
}

/* Moves a slot's counts into its flow's entry. The entry exists (see
 * above); should it not, it is created from the counts, and when the map
 * is full too its packets are counted lost (map_full and ring_lost, as a
 * packet that finds both full). */
static __always_inline void flush_slot(void *map, struct flow_slot *s)
{
	if (!(s->packets[0] | s->packets[1]))
		return;
	struct flow_stats *v = bpf_map_lookup_elem(map, &s->key);
	if (!v) {
		struct flow_stats nv;
		__builtin_memset(&nv, 0, sizeof(nv));
		nv.first_seen_ns = bpf_ktime_get_ns();
		nv.first_seen_jiffies = s->last_seen_jiffies;
		nv.last_seen_jiffies = s->last_seen_jiffies;
		nv.first_side = s->packets[0] ? 1 : 2;
		long err = bpf_map_update_elem(map, &s->key, &nv, BPF_NOEXIST);
		if (err && err != -17 /* EEXIST: created by another CPU meanwhile */) {
			stat_add(STAT_MAP_FULL, s->packets[0] + s->packets[1]);
			stat_add(STAT_RING_LOST, s->packets[0] + s->packets[1]);
			return;
		}
		v = bpf_map_lookup_elem(map, &s->key);
		if (!v)
			return;
	}
	__sync_fetch_and_add(&v->packets[0], s->packets[0]);
	__sync_fetch_and_add(&v->packets[1], s->packets[1]);
	__sync_fetch_and_add(&v->bytes[0], s->bytes[0]);
	__sync_fetch_and_add(&v->bytes[1], s->bytes[1]);
	if (s->tcp_flags[0])
		__sync_fetch_and_or(&v->tcp_flags[0], (__u32)s->tcp_flags[0]);
	if (s->tcp_flags[1])
		__sync_fetch_and_or(&v->tcp_flags[1], (__u32)s->tcp_flags[1]);
	if (v->last_seen_jiffies < s->last_seen_jiffies)
		v->last_seen_jiffies = s->last_seen_jiffies;
}

/* Gives a slot to a flow: the counts of the flow that had it go to its
 * entry first. `young` says whether each side (bit 0: side 0, bit 1:
 * side 1) is still young. Out of line: it runs once per slot taken, and
 * keeping it off the packet path's code keeps every other packet from
 * paying for it. */
static __noinline int fill_slot(void *map, struct flow_slot *s, const struct flow_key4 *k,
				__u32 young, __u64 jiffies)
{
	flush_slot(map, s);
	__builtin_memcpy(&s->key, k, sizeof(*k));
	s->packets[0] = 0;
	s->packets[1] = 0;
	s->bytes[0] = 0;
	s->bytes[1] = 0;
	s->last_seen_jiffies = jiffies;
	s->tcp_flags[0] = 0;
	s->tcp_flags[1] = 0;
	s->young[0] = young & 1;
	s->young[1] = (young >> 1) & 1;
	return 0;
}

/* account() for the IPv4 maps, with the cache in front of the map. */
static __always_inline void account4(struct __sk_buff *skb, struct pkt *p, void *map,
				     void *cache, struct flow_key4 *k, __u32 side)
{
	__u64 jiffies = bpf_jiffies64();
	int handshake = p->opens || p->synack;
	struct flow_slot *s = slot_at(cache, slot_index(k));
	int mine = s && slot_holds(s, k);
	if (mine && !handshake) {
		if (side) {
			if (!s->young[1]) {
				s->packets[1] += 1;
				s->bytes[1] += skb->len;
				s->tcp_flags[1] |= p->tcp_flags;
				s->last_seen_jiffies = jiffies;
				return;
			}
		} else if (!s->young[0]) {
			s->packets[0] += 1;
			s->bytes[0] += skb->len;
			s->tcp_flags[0] |= p->tcp_flags;
			s->last_seen_jiffies = jiffies;
			return;
		}
	}
	__u64 sent;
	struct flow_stats *v = account(skb, p, map, k, side, jiffies, &sent);
	if (!v || !s || handshake || sent <= CACHE_YOUNG)
		return;
	if (names_enabled && (p->k.port[0] == 53 || p->k.port[1] == 53))
		return;
	if (mine) {
		/* The sender's side is old now: its packets may use the slot. */
		if (side)
			s->young[1] = 0;
		else
			s->young[0] = 0;
		return;
	}
	if ((s->packets[0] | s->packets[1]) && jiffies - s->last_seen_jiffies < CACHE_IDLE)
		return; /* the slot's flow is still busy: it keeps the slot */
	if (side)
		fill_slot(map, s, k, v->packets[0] <= CACHE_YOUNG, jiffies);
	else
		fill_slot(map, s, k, (v->packets[1] <= CACHE_YOUNG) << 1, jiffies);
}

/* Counts an ICMP error into the flow whose packet it quotes, creating the
 * entry (without packets) when that flow's packets were drained already. */
static __always_inline void bump_unreach(void *map, void *k, __u32 side)
{
	struct flow_stats *v = bpf_map_lookup_elem(map, k);
	if (!v) {
		struct flow_stats nv;
		__builtin_memset(&nv, 0, sizeof(nv));
		__u64 now = bpf_ktime_get_ns();
		nv.first_seen_ns = now;
		nv.first_seen_jiffies = bpf_jiffies64();
		nv.last_seen_jiffies = nv.first_seen_jiffies;
		nv.first_side = side + 1;
		nv.unreach = 1;
		nv.unreach_side = side + 1;
		long err = bpf_map_update_elem(map, k, &nv, BPF_NOEXIST);
		if (err != -17 /* EEXIST */) {
			if (err)
				stat_inc(STAT_MAP_FULL);
			return;
		}
		v = bpf_map_lookup_elem(map, k);
		if (!v)
			return;
	}
	__sync_fetch_and_add(&v->unreach, 1);
	if (!v->unreach_side)
		v->unreach_side = side + 1;
}

/* An ICMP or ICMPv6 destination unreachable quotes the IP header and the
 * first bytes of the packet that failed, starting at off: count it into
 * that packet's flow on this interface. Runs for ICMP errors only. */
static __noinline int quoted_unreachable(struct __sk_buff *skb, __u32 off, __u32 v6)
{
	struct flow_key k;
	__builtin_memset(&k, 0, sizeof(k));
	__u32 l4;
	int later_fragment = 0;
	if (!v6) {
		__u8 h_buf[20];
		__u8 *h = hdr(skb, off, h_buf, 20);
		if (!h || (h[0] >> 4) != 4 || (h[0] & 0x0f) < 5)
			return 0;
		__be32 sa, da;
		__builtin_memcpy(&sa, h + 12, 4);
		__builtin_memcpy(&da, h + 16, 4);
		set_v4mapped(k.addr[0], sa);
		set_v4mapped(k.addr[1], da);
		k.proto = h[9];
		k.family = 4;
		later_fragment = ((h[6] & 0x1f) | h[7]) != 0;
		l4 = off + (h[0] & 0x0f) * 4;
	} else {
		__u8 h_buf[40];
		__u8 *h = hdr(skb, off, h_buf, 40);
		if (!h || (h[0] >> 4) != 6)
			return 0;
		__builtin_memcpy(k.addr[0], h + 8, 16);
		__builtin_memcpy(k.addr[1], h + 24, 16);
		k.proto = h[6];
		k.family = 6;
		l4 = off + 40;
	}
	__u8 pr = k.proto;
	if (!later_fragment && (pr == IPPROTO_TCP || pr == IPPROTO_UDP ||
				pr == IPPROTO_UDPLITE || pr == IPPROTO_SCTP)) {
		__u8 ports[4];
		if (load(skb, l4, ports, 4))
			return 0;
		k.port[0] = ((__u16)ports[0] << 8) | ports[1];
		k.port[1] = ((__u16)ports[2] << 8) | ports[3];
	}
	__u32 side = canonical(skb, &k);
	if (is_flow4(&k)) {
		struct flow_key4 k4;
		key4_of(&k4, &k);
		if (active_map)
			bump_unreach(&flows4_b, &k4, side);
		else
			bump_unreach(&flows4_a, &k4, side);
	} else if (active_map)
		bump_unreach(&flows_b, &k, side);
	else
		bump_unreach(&flows_a, &k, side);
	return 0;
}

/* Parse the L4 header at off. Returns PARSE_OK when the packet is a flow, else the stat to count. */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, struct pkt *p)
{
	p->l4_off = off;
	switch (p->k.proto) {
	case IPPROTO_TCP: {
		__u8 h_buf[20];
		__u8 *h = hdr(skb, off, h_buf, 20);
		if (!h)
			return STAT_TRUNCATED;
		if ((h[12] >> 4) < 5)
			return STAT_BAD_HEADER;
		p->k.port[0] = ((__u16)h[0] << 8) | h[1];
		p->k.port[1] = ((__u16)h[2] << 8) | h[3];
		p->tcp_flags = h[13];
		/* SYN without ACK opens; SYN+ACK answers. */
		p->opens = (h[13] & 0x12) == 0x02;
		p->synack = (h[13] & 0x12) == 0x12;
		return PARSE_OK;
	}
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE: {
		__u8 h_buf[8];
		__u8 *h = hdr(skb, off, h_buf, 8);
		if (!h)
			return STAT_TRUNCATED;
		p->k.port[0] = ((__u16)h[0] << 8) | h[1];
		p->k.port[1] = ((__u16)h[2] << 8) | h[3];
		return PARSE_OK;
	}
	case IPPROTO_SCTP: {
		__u8 h_buf[12];
		__u8 *h = hdr(skb, off, h_buf, 12);
		if (!h)
			return STAT_TRUNCATED;
		p->k.port[0] = ((__u16)h[0] << 8) | h[1];
		p->k.port[1] = ((__u16)h[2] << 8) | h[3];
		return PARSE_OK;
	}
	case IPPROTO_ICMP:
	case 58 /* IPPROTO_ICMPV6 */: {
		__u8 h_buf[8];
		__u8 *h = hdr(skb, off, h_buf, 8);
		if (!h)
			return STAT_TRUNCATED;
		if (p->k.proto == IPPROTO_ICMP) {
			p->opens = h[0] == 8;   /* echo request */
			/* Destination unreachable, except "fragmentation
			 * needed" (path MTU discovery, not a failure). */
			if (h[0] == 3 && h[1] != 4)
				quoted_unreachable(skb, off + 8, 0);
		} else {
			p->opens = h[0] == 128; /* echo request */
			if (h[0] == 1)          /* destination unreachable */
				quoted_unreachable(skb, off + 8, 1);
		}
		return PARSE_OK;
	}
	default:
		return PARSE_OK; /* counted by protocol number, no ports */
	}
}

static __always_inline void frag_key_of(struct frag_key *fk, struct pkt *p, __u32 id)
{
	__builtin_memset(fk, 0, sizeof(*fk));
	__builtin_memcpy(fk->saddr, p->k.addr[0], 16);
	__builtin_memcpy(fk->daddr, p->k.addr[1], 16);
	fk->id = id;
	fk->proto = p->k.proto;
}

/* L4 for an IP packet that may be a fragment: first fragments record their
 * ports, later fragments borrow them. */
static __always_inline int parse_l4_frag(struct __sk_buff *skb, __u32 off, struct pkt *p,
					 int fragmented, int first, __u32 id)
{
	struct frag_key fk;
	__u8 pr = p->k.proto;
	int has_ports = pr == IPPROTO_TCP || pr == IPPROTO_UDP || pr == IPPROTO_UDPLITE ||
			pr == IPPROTO_SCTP;
	/* A later fragment of a protocol without ports (ICMP, GRE, ESP, ...)
	 * belongs to the port-less flow whether or not its head was seen. */
	if (fragmented && !first && !has_ports)
		return PARSE_OK;
	if (fragmented && !first) {
		frag_key_of(&fk, p, id);
		struct frag_ports *fp = bpf_map_lookup_elem(&frags, &fk);
		if (fp) {
			p->k.port[0] = fp->sport;
			p->k.port[1] = fp->dport;
		} else {
			stat_inc(STAT_FRAG_NO_HEAD);
		}
		return PARSE_OK;
	}
	int r = parse_l4(skb, off, p);
	if (r != PARSE_OK)
		return r;
	if (fragmented && (p->k.port[0] || p->k.port[1])) {
		struct frag_ports fp = { .sport = p->k.port[0], .dport = p->k.port[1] };
		frag_key_of(&fk, p, id);
		bpf_map_update_elem(&frags, &fk, &fp, BPF_ANY);
	}
	return PARSE_OK;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct pkt *p)
{
	__u8 h_buf[20];
	__u8 *h = hdr(skb, off, h_buf, 20);
	if (!h)
		return STAT_TRUNCATED;
	if ((h[0] >> 4) != 4)
		return STAT_BAD_HEADER;
	__u32 ihl = (h[0] & 0x0f) * 4;
	if (ihl < 20)
		return STAT_BAD_HEADER;
	p->l3_end = off + (((__u32)h[2] << 8) | h[3]);
	if (off + ihl > skb->len)
		return STAT_TRUNCATED;
	__u16 frag = ((__u16)h[6] << 8) | h[7];
	__u16 frag_off = frag & 0x1fff;
	int more = (frag & 0x2000) != 0;
	__be32 sa, da;
	__builtin_memcpy(&sa, h + 12, 4);
	__builtin_memcpy(&da, h + 16, 4);
	set_v4mapped(p->k.addr[0], sa);
	set_v4mapped(p->k.addr[1], da);
	p->k.proto = h[9];
	p->k.family = 4;
	__u32 id = ((__u32)h[4] << 8) | h[5];
	return parse_l4_frag(skb, off + ihl, p, frag_off || more, frag_off == 0, id);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct pkt *p)
{
	__u8 h_buf[40];
	__u8 *h = hdr(skb, off, h_buf, 40);
	if (!h)
		return STAT_TRUNCATED;
	if ((h[0] >> 4) != 6)
		return STAT_BAD_HEADER;
	__builtin_memcpy(p->k.addr[0], h + 8, 16);
	__builtin_memcpy(p->k.addr[1], h + 24, 16);
	p->k.family = 6;
	p->l3_end = off + 40 + (((__u32)h[4] << 8) | h[5]);
	__u8 next = h[6];
	off += 40;
	int fragmented = 0, first = 1;
	__u32 id = 0;

	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		switch (next) {
		case 0:   /* hop-by-hop */
		case 43:  /* routing */
		case 60:  /* destination options */
		case 135: /* mobility */
		case 139: /* HIP */
		case 140: /* shim6 */ {
			__u8 e_buf[2];
			__u8 *e = hdr(skb, off, e_buf, 2);
			if (!e)
				return STAT_TRUNCATED;
			next = e[0];
			off += ((__u32)e[1] + 1) * 8;
			break;
		}
		case 51: /* authentication header */ {
			__u8 e_buf[2];
			__u8 *e = hdr(skb, off, e_buf, 2);
			if (!e)
				return STAT_TRUNCATED;
			next = e[0];
			off += ((__u32)e[1] + 2) * 4;
			break;
		}
		case 44: /* fragment */ {
			__u8 e_buf[8];
			__u8 *e = hdr(skb, off, e_buf, 8);
			if (!e)
				return STAT_TRUNCATED;
			next = e[0];
			__u16 fo = ((__u16)e[2] << 8) | e[3];
			fragmented = 1;
			first = (fo >> 3) == 0;
			id = ((__u32)e[4] << 24) | ((__u32)e[5] << 16) | ((__u32)e[6] << 8) | e[7];
			off += 8;
			if (!first) {
				p->k.proto = next;
				return parse_l4_frag(skb, off, p, 1, 0, id);
			}
			break;
		}
		default:
			p->k.proto = next;
			if (off > skb->len)
				return STAT_TRUNCATED;
			return parse_l4_frag(skb, off, p, fragmented, first, id);
		}
	}
	/* Still an extension header after MAX_IPV6_EXT of them. */
	switch (next) {
	case 0: case 43: case 44: case 51: case 60: case 135: case 139: case 140:
		return STAT_EXT_CHAIN_TOO_LONG;
	}
	p->k.proto = next;
	if (off > skb->len)
		return STAT_TRUNCATED;
	return parse_l4_frag(skb, off, p, fragmented, first, id);
}

static __always_inline int parse_ip_at(struct __sk_buff *skb, __u32 off, __u16 eth_proto,
				       struct pkt *p)
{
	if (eth_proto == ETH_P_IP)
		return parse_ipv4(skb, off, p);
	if (eth_proto == ETH_P_IPV6)
		return parse_ipv6(skb, off, p);
	return STAT_NON_IP;
}

static __always_inline void finish(struct __sk_buff *skb, struct pkt *p, int r)
{
	/* One call site per map, so the verifier can inline each lookup. */
	if (r == PARSE_OK) {
		__u32 side = canonical(skb, &p->k);
		if (is_flow4(&p->k)) {
			struct flow_key4 k4;
			key4_of(&k4, &p->k);
			if (active_map)
				account4(skb, p, &flows4_b, &cache_b, &k4, side);
			else
				account4(skb, p, &flows4_a, &cache_a, &k4, side);
		} else {
			__u64 sent;
			if (active_map)
				account(skb, p, &flows_b, &p->k, side, bpf_jiffies64(), &sent);
			else
				account(skb, p, &flows_a, &p->k, side, bpf_jiffies64(), &sent);
		}
	} else
		stat_inc(r);
}

/* Devices with an Ethernet header. */
static __always_inline int handle_eth(struct __sk_buff *skb)
{
	struct pkt p;
	/* Only what the parsers may leave unset: addresses, proto and family
	 * are always written; ifindex and pad by account(). */
	p.k.port[0] = 0;
	p.k.port[1] = 0;
	p.tcp_flags = 0;
	p.opens = 0;
	p.synack = 0;
	p.l4_off = 0;

	__u8 eth_buf[14];
	__u8 *eth = hdr(skb, 0, eth_buf, 14);
	if (!eth) {
		stat_inc(STAT_TRUNCATED);
		return TC_ACT_UNSPEC;
	}
	__u16 proto = ((__u16)eth[12] << 8) | eth[13];
	__u32 off = 14;
	/* In-band 802.1ad / 802.1Q tags. Offloaded tags are not in the data. */
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
			break;
		__u8 tag_buf[4];
		__u8 *tag = hdr(skb, off, tag_buf, 4);
		if (!tag) {
			stat_inc(STAT_TRUNCATED);
			return TC_ACT_UNSPEC;
		}
		proto = ((__u16)tag[2] << 8) | tag[3];
		off += 4;
	}
	finish(skb, &p, parse_ip_at(skb, off, proto, &p));
	return TC_ACT_UNSPEC;
}

/* Devices without a link-layer header (tun, wireguard, ipip, ...). */
static __always_inline int handle_l3(struct __sk_buff *skb)
{
	struct pkt p;
	/* Only what the parsers may leave unset: addresses, proto and family
	 * are always written; ifindex and pad by account(). */
	p.k.port[0] = 0;
	p.k.port[1] = 0;
	p.tcp_flags = 0;
	p.opens = 0;
	p.synack = 0;
	p.l4_off = 0;

	__u8 v;
	if (load(skb, 0, &v, 1)) {
		stat_inc(STAT_TRUNCATED);
		return TC_ACT_UNSPEC;
	}
	__u16 proto = (v >> 4) == 4 ? ETH_P_IP : (v >> 4) == 6 ? ETH_P_IPV6 : 0;
	finish(skb, &p, parse_ip_at(skb, 0, proto, &p));
	return TC_ACT_UNSPEC;
}

/* Hand-over from a classic TC filter to a TCX link on one interface (the
 * agent attaches many interfaces at start with fast classic filters, then
 * moves each to TCX). While both are attached, every packet meets the TCX
 * program first, on the same CPU and with nothing in between: the TCX
 * program marks the packet's control block with a value tied to this
 * device, and the classic program skips (and unmarks) a packet so marked.
 * So every packet is counted once, whatever instant the hand-over takes.
 * The IP layer and the bridge reuse the control block, and another device
 * has another mark, so a mark never reaches another hook. */
#define HANDOVER_MAGIC 0x6f1e5a9dc3b2718fULL

static __always_inline __u64 handover_mark(struct __sk_buff *skb)
{
	return HANDOVER_MAGIC ^ (((__u64)skb->ifindex << 32) | skb->ingress_ifindex);
}

static __always_inline void mark_handover(struct __sk_buff *skb)
{
	__u64 m = handover_mark(skb);
	skb->cb[0] = (__u32)m;
	skb->cb[1] = (__u32)(m >> 32);
}

static __always_inline int counted_by_tcx(struct __sk_buff *skb)
{
	__u64 m = handover_mark(skb);
	if (skb->cb[0] != (__u32)m || skb->cb[1] != (__u32)(m >> 32))
		return 0;
	skb->cb[0] = 0;
	skb->cb[1] = 0;
	return 1;
}

/* TC_ACT_UNSPEC is TCX_NEXT: the next program on the hook always runs.
 * The code is the same at ingress and egress, so one program serves both
 * hooks (a SCHED_CLS program attaches to either). */
SEC("tcx/ingress")
int flowmap_eth(struct __sk_buff *skb)
{
	mark_handover(skb);
	return handle_eth(skb);
}

SEC("tcx/ingress")
int flowmap_l3(struct __sk_buff *skb)
{
	mark_handover(skb);
	return handle_l3(skb);
}

/* The classic TC filters. */
SEC("tc")
int flowmap_eth_tc(struct __sk_buff *skb)
{
	if (counted_by_tcx(skb))
		return TC_ACT_UNSPEC;
	return handle_eth(skb);
}

SEC("tc")
int flowmap_l3_tc(struct __sk_buff *skb)
{
	if (counted_by_tcx(skb))
		return TC_ACT_UNSPEC;
	return handle_l3(skb);
}

/* Not attached anywhere: user space runs it with BPF_PROG_TEST_RUN to read
 * the tick and the clock at one instant. */
SEC("tc")
int flowmap_clock(struct __sk_buff *skb)
{
	clock.ns = bpf_ktime_get_ns();
	clock.jiffies = bpf_jiffies64();
	return TC_ACT_UNSPEC;
}

/* Socket tracepoints (tp_btf: typed arguments, no tracefs needed). Only
 * the fields read are declared; CO-RE finds them in the running kernel. */
struct sock_common {
	union {
		struct {
			__be32 skc_daddr;
			__be32 skc_rcv_saddr;
		};
	};
	union {
		__u32 skc_portpair;
		struct {
			__be16 skc_dport;
			__u16 skc_num;
		};
	};
	unsigned short skc_family;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct request_sock {
	struct sock_common __req_common;
} __attribute__((preserve_access_index));

struct sk_buff {
	char cb[48];
	unsigned char *head;
	__u16 network_header;
	__u16 transport_header;
	__be16 protocol;
} __attribute__((preserve_access_index));

/* The connection of a socket in canonical order; returns the side of the
 * socket's own (local) end, or -1 for a family that is not IP. */
static __always_inline int conn_of(const struct sock_common *c, struct conn_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	unsigned short fam = 0;
	bpf_probe_read_kernel(&fam, sizeof(fam), &c->skc_family);
	if (fam == 2 /* AF_INET */) {
		__be32 l = 0, r = 0;
		bpf_probe_read_kernel(&l, 4, &c->skc_rcv_saddr);
		bpf_probe_read_kernel(&r, 4, &c->skc_daddr);
		set_v4mapped(k->addr[0], l);
		set_v4mapped(k->addr[1], r);
		k->family = 4;
	} else if (fam == 10 /* AF_INET6 */) {
		bpf_probe_read_kernel(k->addr[0], 16, &c->skc_v6_rcv_saddr);
		bpf_probe_read_kernel(k->addr[1], 16, &c->skc_v6_daddr);
		__u64 hi;
		__builtin_memcpy(&hi, k->addr[0], 8);
		/* An IPv4 peer of a dual-stack socket: keyed as IPv4. */
		k->family = hi == 0 && k->addr[0][10] == 0xff && k->addr[0][11] == 0xff ? 4 : 6;
	} else {
		return -1;
	}
	__u16 lport = 0;
	__be16 rport = 0;
	bpf_probe_read_kernel(&lport, 2, &c->skc_num);
	bpf_probe_read_kernel(&rport, 2, &c->skc_dport);
	k->port[0] = lport;
	k->port[1] = bpf_ntohs(rport);
	k->proto = IPPROTO_TCP;
	int side = side_of(k->addr[0], k->port[0], k->addr[1], k->port[1]);
	if (side) {
		__u64 t[2], u[2];
		__builtin_memcpy(t, k->addr[0], 16);
		__builtin_memcpy(u, k->addr[1], 16);
		__builtin_memcpy(k->addr[0], u, 16);
		__builtin_memcpy(k->addr[1], t, 16);
		__u16 p = k->port[0];
		k->port[0] = k->port[1];
		k->port[1] = p;
	}
	return side;
}

static __always_inline void add_retrans(void *map, struct conn_key *k, int side, __u64 segs)
{
	struct conn_health *v = bpf_map_lookup_elem(map, k);
	if (!v) {
		struct conn_health nv = {};
		if (side)
			nv.retrans[1] = segs;
		else
			nv.retrans[0] = segs;
		if (bpf_map_update_elem(map, k, &nv, BPF_NOEXIST) != -17 /* EEXIST */)
			return;
		v = bpf_map_lookup_elem(map, k);
		if (!v)
			return;
	}
	if (side)
		__sync_fetch_and_add(&v->retrans[1], segs);
	else
		__sync_fetch_and_add(&v->retrans[0], segs);
}

static __always_inline void count_retrans(const struct sock_common *c, __u64 segs)
{
	struct conn_key k;
	int side = conn_of(c, &k);
	if (side < 0)
		return;
	if (active_map)
		add_retrans(&health_b, &k, side, segs);
	else
		add_retrans(&health_a, &k, side, segs);
}

/* Newer kernels (6.18 here) give tcp_retransmit_skb a third argument, the
 * error, and fire it for retransmits that were not sent too (-EBUSY while
 * the first copy is still in a queue, -ENOMEM, …), which TcpRetransSegs
 * does not count; its event's record has the field. */
struct trace_event_raw_tcp_retransmit_skb {
	int err;
} __attribute__((preserve_access_index));

/* A data segment (or SYN) sent again: as many segments as the kernel adds
 * to TcpRetransSegs, tcp_skb_pcount() (the GSO segments in the control
 * block, struct tcp_skb_cb at offset 8). */
SEC("tp_btf/tcp_retransmit_skb")
int flowmap_retransmit(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	struct sk_buff *skb = (struct sk_buff *)ctx[1];
	/* (A constant after relocation: on a kernel without the argument the
	 * verifier never sees ctx[2] read.) */
	if (bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err) &&
	    (int)ctx[2] != 0)
		return 0;
	__u16 segs = 0;
	bpf_probe_read_kernel(&segs, 2, &skb->cb[8]);
	count_retrans(&sk->__sk_common, segs ? segs : 1);
	return 0;
}

/* A SYN/ACK sent again by a listener: one segment. */
SEC("tp_btf/tcp_retransmit_synack")
int flowmap_retransmit_synack(__u64 *ctx)
{
	struct request_sock *req = (struct request_sock *)ctx[1];
	count_retrans(&req->__req_common, 1);
	return 0;
}

/* Kernel drops with their reason (skb:kfree_skb). Per drain period, swapped
 * with the flow maps (the same active_map): packets dropped per (connection,
 * reason), or per reason alone when the packet's headers do not parse. When
 * a map is full, a drop counts into its reason's entry; if that cannot be
 * made either, it is counted lost (STAT_DROPS_LOST). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct drop_key);
	__type(value, __u64);
} drops_a SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct drop_key);
	__type(value, __u64);
} drops_b SEC(".maps");

/* Reasons that mean "freed, not dropped", set by user space from the
 * running kernel's BTF before load (SKB_NOT_DROPPED_YET, SKB_CONSUMED,
 * SKB_DROP_REASON_NOT_SPECIFIED). */
const volatile __u32 drop_skip[3] = { 0, 1, 2 };

static __always_inline int add_drop(void *map, const struct drop_key *k)
{
	__u64 *v = bpf_map_lookup_elem(map, k);
	if (v) {
		__sync_fetch_and_add(v, 1);
		return 0;
	}
	__u64 one = 1;
	long rc = bpf_map_update_elem(map, k, &one, BPF_NOEXIST);
	if (rc == 0)
		return 0;
	if (rc != -17 /* EEXIST: made meanwhile */)
		return -1;
	v = bpf_map_lookup_elem(map, k);
	if (!v)
		return -1;
	__sync_fetch_and_add(v, 1);
	return 0;
}

/* The connection of a dropped packet from its network header (skb->head +
 * network_header); 0 when it is IPv4/IPv6 + TCP/UDP (IPv6 without extension
 * headers; IPv4 first fragments only). */
static __always_inline int drop_conn(struct sk_buff *skb, struct conn_key *k)
{
	unsigned char *head = 0;
	__u16 nh = 0;
	__be16 proto = 0;
	bpf_probe_read_kernel(&head, sizeof(head), &skb->head);
	bpf_probe_read_kernel(&nh, 2, &skb->network_header);
	bpf_probe_read_kernel(&proto, 2, &skb->protocol);
	if (!head || nh == 0xffff)
		return -1;
	unsigned char *ip = head + nh;
	__u32 l4off;
	if (proto == bpf_htons(ETH_P_IP)) {
		__u8 h[20];
		if (bpf_probe_read_kernel(h, 20, ip) || (h[0] >> 4) != 4)
			return -1;
		if (((h[6] & 0x1f) | h[7]) != 0) /* not the first fragment */
			return -1;
		k->proto = h[9];
		__be32 a, b;
		__builtin_memcpy(&a, h + 12, 4);
		__builtin_memcpy(&b, h + 16, 4);
		set_v4mapped(k->addr[0], a);
		set_v4mapped(k->addr[1], b);
		k->family = 4;
		l4off = (h[0] & 0xf) * 4;
		if (l4off < 20)
			return -1;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		__u8 h[8];
		if (bpf_probe_read_kernel(h, 8, ip) || (h[0] >> 4) != 6)
			return -1;
		k->proto = h[6];
		if (bpf_probe_read_kernel(k->addr[0], 16, ip + 8) ||
		    bpf_probe_read_kernel(k->addr[1], 16, ip + 24))
			return -1;
		k->family = 6;
		l4off = 40;
	} else {
		return -1;
	}
	if (k->proto != IPPROTO_TCP && k->proto != IPPROTO_UDP)
		return -1;
	__be16 ports[2];
	if (bpf_probe_read_kernel(ports, 4, ip + l4off))
		return -1;
	k->port[0] = bpf_ntohs(ports[0]);
	k->port[1] = bpf_ntohs(ports[1]);
	if (side_of(k->addr[0], k->port[0], k->addr[1], k->port[1])) {
		__u64 t[2], u[2];
		__builtin_memcpy(t, k->addr[0], 16);
		__builtin_memcpy(u, k->addr[1], 16);
		__builtin_memcpy(k->addr[0], u, 16);
		__builtin_memcpy(k->addr[1], t, 16);
		__u16 p = k->port[0];
		k->port[0] = k->port[1];
		k->port[1] = p;
	}
	return 0;
}

/* Counts a drop; when the map is full, into its reason's entry. */
static __always_inline int count_drop(void *map, struct drop_key *k)
{
	if (add_drop(map, k) == 0)
		return 0;
	if (!k->conn.family)
		return -1;
	__builtin_memset(&k->conn, 0, sizeof(k->conn));
	return add_drop(map, k);
}

/* Every freed skb passes here: the reasons that are not drops return at
 * once, before anything is read. */
SEC("tp_btf/kfree_skb")
int flowmap_kfree_skb(__u64 *ctx)
{
	__u32 reason = (__u32)ctx[2];
	if (reason == drop_skip[0] || reason == drop_skip[1] || reason == drop_skip[2])
		return 0;
	struct drop_key k;
	__builtin_memset(&k, 0, sizeof(k));
	k.reason = reason;
	if (drop_conn((struct sk_buff *)ctx[0], &k.conn))
		__builtin_memset(&k.conn, 0, sizeof(k.conn));
	int rc = active_map ? count_drop(&drops_b, &k) : count_drop(&drops_a, &k);
	if (rc)
		stat_inc(STAT_DROPS_LOST);
	return 0;
}

/* Smoothed RTT of established TCP connections, per drain period: at most
 * one sample per local socket and period, read from tcp_sock.srtt_us, taken
 * at the socket's first segment received in the period (tcp:tcp_probe, so
 * connections that stay open are sampled every period they carry traffic)
 * and again when it leaves ESTABLISHED (closing). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096); /* set by user space before load */
	__type(key, struct conn_key);
	__type(value, struct conn_rtt);
} srtt_a SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct conn_key);
	__type(value, struct conn_rtt);
} srtt_b SEC(".maps");

/* The drain period, counted by user space at each swap; its parity is
 * active_map's, so one read names both the period and the map to write. */
volatile __u32 rtt_period = 0;

/* Per socket (freed with it): the last period it was sampled in, plus one
 * (a new storage reads 0: never sampled). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} rtt_seen SEC(".maps");

/* Per CPU, a small direct-mapped cache of sockets this CPU found already
 * sampled, with the period (plus one): the segments of busy connections
 * (both ends of a veth pair share a CPU) stop here without touching the
 * socket's storage; the ports tell a socket apart from a later one at the
 * same address. */
#define RTT_LAST_SLOTS 8

struct rtt_last {
	__u64 sk;
	__u32 ports;
	__u32 seen;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RTT_LAST_SLOTS);
	__type(key, __u32);
	__type(value, struct rtt_last);
} rtt_last SEC(".maps");

struct tcp_sock {
	__u32 srtt_us; /* smoothed RTT << 3, in microseconds */
} __attribute__((preserve_access_index));

static __always_inline int put_srtt(void *map, const struct conn_key *k, int side, __u32 us)
{
	struct conn_rtt *v = bpf_map_lookup_elem(map, k);
	if (!v) {
		struct conn_rtt nv = {};
		if (side)
			nv.srtt_us[1] = us;
		else
			nv.srtt_us[0] = us;
		long rc = bpf_map_update_elem(map, k, &nv, BPF_NOEXIST);
		if (rc == 0)
			return 0;
		if (rc != -17 /* EEXIST */)
			return -1;
		v = bpf_map_lookup_elem(map, k);
		if (!v)
			return -1;
	}
	if (side)
		v->srtt_us[1] = us;
	else
		v->srtt_us[0] = us;
	return 0;
}

/* Records the socket's smoothed RTT into the map of `period`. */
static __always_inline void sample_srtt(struct sock *sk, __u32 period)
{
	__u32 srtt = 0;
	bpf_probe_read_kernel(&srtt, 4, &((struct tcp_sock *)sk)->srtt_us);
	srtt >>= 3;
	if (!srtt)
		srtt = 1; /* under 1 µs: still a sample */
	struct conn_key k;
	int side = conn_of(&sk->__sk_common, &k);
	if (side < 0)
		return;
	int rc = period & 1 ? put_srtt(&srtt_b, &k, side, srtt) : put_srtt(&srtt_a, &k, side, srtt);
	if (rc)
		stat_inc(STAT_SRTT_LOST);
}

SEC("tp_btf/inet_sock_set_state")
int flowmap_sock_state(__u64 *ctx)
{
	if ((int)ctx[1] != 1 /* TCP_ESTABLISHED */)
		return 0;
	struct sock *sk = (struct sock *)ctx[0];
	__u16 proto = 0;
	bpf_probe_read_kernel(&proto, 2, &sk->sk_protocol);
	if (proto != IPPROTO_TCP)
		return 0;
	sample_srtt(sk, rtt_period);
	return 0;
}

/* Every TCP segment an ESTABLISHED socket receives passes here
 * (tcp_rcv_established, before the segment's own ACK updates the
 * estimate): a socket already sampled this period returns after one
 * socket-storage lookup. */
SEC("tp_btf/tcp_probe")
int flowmap_rtt(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	__u32 period = rtt_period;
	__u32 ports = sk->__sk_common.skc_portpair;
	__u32 slot = (ports * 0x9E3779B1u) >> 29; /* 3 bits: RTT_LAST_SLOTS */
	struct rtt_last *last = bpf_map_lookup_elem(&rtt_last, &slot);
	if (!last)
		return 0;
	if (last->sk == (__u64)sk && last->ports == ports && last->seen == period + 1)
		return 0;
	__u32 *seen = bpf_sk_storage_get(&rtt_seen, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!seen)
		return 0;
	last->sk = (__u64)sk;
	last->ports = ports;
	last->seen = period + 1;
	if (*seen == period + 1)
		return 0;
	*seen = period + 1;
	sample_srtt(sk, period);
	return 0;
}

#include "procs.bpf.h"
