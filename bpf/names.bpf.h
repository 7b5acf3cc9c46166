/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Names of peers (issue 14): DNS answers, TLS ClientHellos and HTTP
 * request heads, handed to user space through the `names` ring buffer so
 * it can name the ends of a connection. Included by flows.bpf.c; its one call site is account().
 *
 * What leaves the kernel is the minimum: a DNS message from port 53 (at
 * most NAME_DNS_CAP bytes), a client's TLS ClientHello, only the bytes
 * of its handshake record (in records of at most NAME_TLS_CAP bytes, at
 * most HELLO_SEGS per skb and HELLO_SEGS skbs per hello), and the first
 * NAME_HTTP_CAP bytes of a young connection's segment that starts a plain
 * HTTP/1 request (for its Host header), and a client's first datagrams to
 * UDP port 443 that are QUIC Initial packets (at most NAME_TLS_CAP bytes).
 * Nothing else of any payload. Each CPU hands over at most `names_per_sec` records
 * a second; what is over that is counted (STAT_NAMES_LIMITED), and so is
 * what finds the ring full (STAT_NAMES_LOST).
 *
 * Cost for every other packet: one load of `names_enabled`, the protocol
 * and the ports, and for TCP (and UDP to 443) the sender's packet count of
 * the flow entry (already in cache): payload bytes are looked at only for
 * the first HELLO_YOUNG packets a side sends into a TCP flow entry, and
 * the first QUIC_YOUNG datagrams a client sends to UDP port 443.
 */
#ifndef FLOWMAP_NAMES_BPF_H
#define FLOWMAP_NAMES_BPF_H

#define HELLO_YOUNG 8 /* a side's first packets of a flow entry may start a hello */
#define HELLO_SEGS 4  /* segments of one ClientHello handed over at most */
#define QUIC_YOUNG 4  /* a client's first datagrams may carry its Initials */

/* Set by user space before load: capture names (0: off, the
 * `capture_names` option). Read-only data, so the verifier knows the value
 * and removes the check (and, when off, all of this code) from the
 * packet path. */
const volatile __u32 names_enabled = 0;
/* Set by user space after load: the per-CPU rate. */
volatile __u32 names_per_sec = 0;

struct name_budget {
	__u64 window_ns;
	__u64 used;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct name_budget);
} name_budget SEC(".maps");

/* A record is assembled here and copied into the ring with its real size. */
struct name_buf {
	struct name_event e;
	__u8 data[NAME_TLS_CAP];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct name_buf);
} name_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} names SEC(".maps");

/* A ClientHello longer than its first segment: where its next segment
 * starts and how much of it is still to come. Key in packet order. */
struct hello_key { /* the first fields of struct name_event */
	__u8 addr[2][16];
	__u32 ifindex;
	__u16 port[2];
};

struct hello_next {
	__u32 seq;
	__u32 left;
	__u32 segs;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct hello_key);
	__type(value, struct hello_next);
} hellos SEC(".maps");

struct name_event name_event_layout = {};

/* The sender's and the receiver's address and port, and the interface:
 * the start of a name_event, and a hello_key. */
static __always_inline void hello_key_of(struct hello_key *hk, struct __sk_buff *skb,
					 struct pkt *p, __u32 side)
{
	/* Branches, not [side] indexing: fixed stack offsets for the verifier. */
	if (side) {
		__builtin_memcpy(hk->addr[0], p->k.addr[1], 16);
		__builtin_memcpy(hk->addr[1], p->k.addr[0], 16);
		hk->port[0] = p->k.port[1];
		hk->port[1] = p->k.port[0];
	} else {
		__builtin_memcpy(hk->addr[0], p->k.addr[0], 16);
		__builtin_memcpy(hk->addr[1], p->k.addr[1], 16);
		hk->port[0] = p->k.port[0];
		hk->port[1] = p->k.port[1];
	}
	hk->ifindex = skb->ifindex;
}

/* The per-CPU rate: 1 when this record may go. */
static __always_inline int names_budget_ok(void)
{
	__u32 zero = 0;
	struct name_budget *b = bpf_map_lookup_elem(&name_budget, &zero);
	if (!b)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (now - b->window_ns >= 1000000000ULL) {
		b->window_ns = now;
		b->used = 0;
	}
	if (b->used >= names_per_sec) {
		stat_inc(STAT_NAMES_LIMITED);
		return 0;
	}
	b->used++;
	return 1;
}

/* Hands `len` bytes at `off` (1..cap) to user space, sender first. */
static __always_inline void names_emit(struct __sk_buff *skb, struct pkt *p, __u32 side,
				       __u8 kind, __u32 off, __u32 len, __u32 seq)
{
	if (len == 0 || !names_budget_ok())
		return;
	__u32 zero = 0;
	struct name_buf *nb = bpf_map_lookup_elem(&name_scratch, &zero);
	if (!nb)
		return;
	if (len > NAME_TLS_CAP)
		len = NAME_TLS_CAP;
	len = ((len - 1) & (NAME_TLS_CAP - 1)) + 1; /* 1..NAME_TLS_CAP, for the verifier */
	if (bpf_skb_load_bytes(skb, off, nb->data, len))
		return;
	hello_key_of((struct hello_key *)nb->e.addr, skb, p, side);
	nb->e.seq = seq;
	nb->e.len = len;
	nb->e.kind = kind;
	nb->e.family = p->k.family;
	if (bpf_ringbuf_output(&names, nb, sizeof(nb->e) + len, 0))
		stat_inc(STAT_NAMES_LOST);
}

/* Hands over the `len` bytes of a ClientHello at `off` in chunks of at
 * most NAME_TLS_CAP: on egress with TSO/GSO (and after GRO), one skb holds
 * several segments, often the whole hello. */
static __always_inline void names_emit_hello(struct __sk_buff *skb, struct pkt *p, __u32 side,
					     __u32 off, __u32 len, __u32 seq)
{
	for (__u32 i = 0; i < HELLO_SEGS; i++) {
		__u32 done = i * NAME_TLS_CAP;
		if (done >= len)
			break;
		names_emit(skb, p, side, NAME_TLS, off + done, len - done, seq + done);
	}
}

/* Where the TCP payload of this packet starts, how long it is and its
 * sequence number; 0 on success. */
static __always_inline int tcp_payload(struct __sk_buff *skb, struct pkt *p, __u32 *off,
				       __u32 *len, __u32 *seq)
{
	__u8 h_buf[20];
	__u8 *h = hdr(skb, p->l4_off, h_buf, 20);
	if (!h)
		return -1;
	*off = p->l4_off + (h[12] >> 4) * 4;
	*len = p->l3_end > *off ? p->l3_end - *off : 0;
	*seq = ((__u32)h[4] << 24) | ((__u32)h[5] << 16) | ((__u32)h[6] << 8) | h[7];
	return 0;
}

/* The first bytes of a plain HTTP/1 request: a method and its space. */
static __always_inline int http_request(const __u8 *b)
{
	__u32 w = (__u32)b[0] | ((__u32)b[1] << 8) | ((__u32)b[2] << 16) | ((__u32)b[3] << 24);
#define M4(a, b_, c, d) ((__u32)(a) | ((__u32)(b_) << 8) | ((__u32)(c) << 16) | ((__u32)(d) << 24))
	int m = w == M4('G', 'E', 'T', ' ') || w == M4('P', 'U', 'T', ' ') ||
		(b[4] == ' ' && (w == M4('P', 'O', 'S', 'T') || w == M4('H', 'E', 'A', 'D'))) ||
		(b[5] == 'E' && w == M4('D', 'E', 'L', 'E')) ||
		(b[5] == ' ' && w == M4('P', 'A', 'T', 'C')) ||
		(b[5] == 'O' && w == M4('O', 'P', 'T', 'I'));
#undef M4
	return m;
}

/* A young TCP flow: a segment that starts a TLS handshake record holding
 * a ClientHello is handed over; when the record is longer than the
 * segment, the next segments (in order) follow it. */
static __noinline void names_hello(struct __sk_buff *skb, struct pkt *p, __u32 side,
				   struct flow_stats *v)
{
	__u32 off, len, seq;
	/* Hellos and requests come from the client: not the side that
	 * answered a SYN this entry saw. */
	if (v && v->open_side && v->open_side != side + 1)
		return;
	if (!p->l4_off || tcp_payload(skb, p, &off, &len, &seq) || len == 0)
		return;
	struct hello_key hk;
	__u8 b[6];
	if (len >= 6 && !load(skb, off, b, 6)) {
		if (b[0] == 0x16 && b[1] == 0x03 && b[5] == 0x01) {
			__u32 rec = (((__u32)b[3] << 8) | b[4]) + 5;
			/* Only the hello: not what may follow it in the same skb. */
			names_emit_hello(skb, p, side, off, len < rec ? len : rec, seq);
			if (rec > len) {
				struct hello_next n = { .seq = seq + len, .left = rec - len,
							.segs = HELLO_SEGS - 1 };
				hello_key_of(&hk, skb, p, side);
				bpf_map_update_elem(&hellos, &hk, &n, BPF_ANY);
			}
			return;
		}
		if (http_request(b)) {
			/* The request line and headers up to NAME_HTTP_CAP bytes of
			 * this one segment: user space keeps only the Host. */
			names_emit(skb, p, side, NAME_HTTP, off,
				   len < NAME_HTTP_CAP ? len : NAME_HTTP_CAP, seq);
			return;
		}
	}
	hello_key_of(&hk, skb, p, side);
	struct hello_next *n = bpf_map_lookup_elem(&hellos, &hk);
	if (!n || n->seq != seq)
		return;
	names_emit_hello(skb, p, side, off, len < n->left ? len : n->left, seq);
	if (len >= n->left || n->segs <= 1) {
		bpf_map_delete_elem(&hellos, &hk);
	} else {
		n->seq += len;
		n->left -= len;
		n->segs -= 1;
	}
}

/* A young UDP flow to port 443: a datagram that starts with a QUIC
 * version 1 Initial packet is handed over whole (up to NAME_TLS_CAP
 * bytes): its CRYPTO frames hold the ClientHello, which user space
 * decrypts with keys derived from the packet itself. */
static __noinline void names_quic(struct __sk_buff *skb, struct pkt *p, __u32 side)
{
	if (!p->l4_off)
		return;
	__u32 off = p->l4_off + 8;
	__u32 len = p->l3_end > off ? p->l3_end - off : 0;
	__u8 b[5];
	/* Initials are at least 1200 bytes (RFC 9000, 14.1). */
	if (len < 1200 || load(skb, off, b, 5))
		return;
	if ((b[0] & 0xf0) != 0xc0 || b[1] || b[2] || b[3] || b[4] != 1)
		return;
	names_emit(skb, p, side, NAME_QUIC, off, len, 0);
}

/* A DNS message from port 53 (UDP, or a TCP segment). */
static __noinline void names_dns(struct __sk_buff *skb, struct pkt *p, __u32 side)
{
	__u32 off, len, seq = 0;
	/* A later fragment has no L4 header; port 53 of SCTP is no DNS here. */
	if (!p->l4_off || (p->k.proto != IPPROTO_UDP && p->k.proto != IPPROTO_TCP))
		return;
	if (p->k.proto == IPPROTO_UDP) {
		off = p->l4_off + 8;
		len = p->l3_end > off ? p->l3_end - off : 0;
	} else if (tcp_payload(skb, p, &off, &len, &seq)) {
		return;
	}
	names_emit(skb, p, side, p->k.proto == IPPROTO_UDP ? NAME_DNS_UDP : NAME_DNS_TCP, off,
		   len > NAME_DNS_CAP ? NAME_DNS_CAP : len, seq);
}

/* The one call site (account()): `v` is the packet's flow entry after the
 * packet was added (NULL when it was just created or overflowed), `sent`
 * the sender's packets in it (1 without an entry). The checks here are
 * inlined; the work is in functions of their own (BPF subprograms), so
 * the packet path stays small for the verifier. An established packet
 * (past HELLO_YOUNG, neither port 53) leaves at the first test. */
static __always_inline void names_packet(struct __sk_buff *skb, struct pkt *p, __u32 side,
					 struct flow_stats *v, __u64 sent)
{
	if (!names_enabled)
		return;
	if (sent > HELLO_YOUNG && p->k.port[0] != 53 && p->k.port[1] != 53)
		return;
	__u16 sport = side ? p->k.port[1] : p->k.port[0];
	if (sport == 53) {
		names_dns(skb, p, side);
		return;
	}
	if (p->k.proto == IPPROTO_UDP) {
		__u16 dport = side ? p->k.port[0] : p->k.port[1];
		if (dport == 443 && sent <= QUIC_YOUNG)
			names_quic(skb, p, side);
		return;
	}
	if (p->k.proto != IPPROTO_TCP)
		return;
	if (sent <= HELLO_YOUNG)
		names_hello(skb, p, side, v);
}

#endif
