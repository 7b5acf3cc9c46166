/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Processes of local sockets (issue 14): which task opened a TCP
 * connection, or listens for them, handed to user space through the
 * `procs` ring buffer so it can name the local ends of a connection by
 * process, systemd unit and container. Included at the end of
 * flows.bpf.c (it uses conn_of()).
 *
 * One program on the sock:inet_sock_set_state tracepoint (tp_btf: no
 * kprobes; fentry/fexit are refused with EPERM on this kernel), which runs
 * a few times per connection, never per packet:
 * - CLOSE -> SYN_SENT runs in the task that called connect(), before the
 *   kernel picks the ephemeral port: the task is kept per socket (an LRU
 *   map) until the socket leaves SYN_SENT, when its ports are known and
 *   the record goes out (established or not).
 * - -> LISTEN runs in the task that called listen(), with the port bound:
 *   connections accepted on that port belong to that process (user space
 *   keeps listeners; the accepting task itself has no tracepoint).
 * What finds the ring full is counted (STAT_PROCS_LOST). Connections and
 * listeners older than the agent are found in user space (sock_diag and
 * /proc).
 */
#ifndef FLOWMAP_PROCS_BPF_H
#define FLOWMAP_PROCS_BPF_H

enum proc_kind {
	PROC_CONNECT = 0, /* the socket connected (SYN_SENT left) */
	PROC_LISTEN = 1,  /* the socket listens (conn: local end, remote zero) */
};

/* The task that owns a socket. */
struct proc_task {
	__u64 cgroup_id;      /* the task's cgroup (v2 hierarchy) */
	__u32 tgid;           /* the process */
	__u32 pid;            /* the thread */
	__u8 comm[16];        /* the process (thread group leader) name */
};

/* One local socket of a TCP connection (or a listener) and its task. */
struct proc_event {
	struct conn_key conn; /* canonical order, as the health maps */
	struct proc_task task;
	__u8 side;            /* the side of conn that is this task's socket */
	__u8 kind;            /* enum proc_kind */
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} procs SEC(".maps");

/* Sockets in SYN_SENT and the task that connected them, by address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct proc_task);
} connecting SEC(".maps");

struct proc_event proc_event_layout = {};

struct task_struct {
	struct task_struct *group_leader;
	char comm[16];
} __attribute__((preserve_access_index));

/* The current task: process, thread, cgroup and the process's name (its
 * main thread's: worker threads often name themselves). */
static __always_inline void current_task(struct proc_task *t)
{
	__u64 id = bpf_get_current_pid_tgid();
	t->tgid = id >> 32;
	t->pid = (__u32)id;
	t->cgroup_id = bpf_get_current_cgroup_id();
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct task_struct *leader = 0;
	bpf_probe_read_kernel(&leader, sizeof(leader), &task->group_leader);
	if (!leader || bpf_probe_read_kernel_str(t->comm, sizeof(t->comm), leader->comm) < 0)
		__builtin_memset(t->comm, 0, sizeof(t->comm));
}

static __always_inline void proc_emit(struct sock *sk, const struct proc_task *t, __u8 kind)
{
	struct conn_key k;
	int side = conn_of(&sk->__sk_common, &k);
	if (side < 0)
		return;
	struct proc_event *e = bpf_ringbuf_reserve(&procs, sizeof(*e), 0);
	if (!e) {
		stat_inc(STAT_PROCS_LOST);
		return;
	}
	__builtin_memcpy(&e->conn, &k, sizeof(k));
	__builtin_memcpy(&e->task, t, sizeof(*t));
	e->side = side;
	e->kind = kind;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	bpf_ringbuf_submit(e, 0);
}

SEC("tp_btf/inet_sock_set_state")
int flowmap_proc_state(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	int old = (int)ctx[1], new = (int)ctx[2];
	if (new != 2 /* TCP_SYN_SENT */ && new != 10 /* TCP_LISTEN */ && old != 2)
		return 0;
	__u16 proto = 0;
	bpf_probe_read_kernel(&proto, 2, &sk->sk_protocol);
	if (proto != IPPROTO_TCP)
		return 0;
	__u64 key = (__u64)sk;
	struct proc_task t;
	if (new == 2) {
		current_task(&t);
		bpf_map_update_elem(&connecting, &key, &t, BPF_ANY);
		return 0;
	}
	if (new == 10) {
		current_task(&t);
		proc_emit(sk, &t, PROC_LISTEN);
		return 0;
	}
	/* Leaving SYN_SENT: the ports are known now. */
	struct proc_task *c = bpf_map_lookup_elem(&connecting, &key);
	if (!c)
		return 0;
	__builtin_memcpy(&t, c, sizeof(t));
	bpf_map_delete_elem(&connecting, &key);
	proc_emit(sk, &t, PROC_CONNECT);
	return 0;
}

#endif
