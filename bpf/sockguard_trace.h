/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sockguard_trace.h - the one event record every tracer object writes.
 *
 * Shared by trace_sockhash.bpf.c, trace_recvpath.bpf.c and
 * trace_lifecycle.bpf.c because sockguard/tracer.py decodes all three ring
 * buffers with a single struct (EVENT in tracer.py mirrors this layout; keep
 * them in step).  Fixed size (256 bytes, 8-byte aligned) on purpose: one
 * decoder, no per-type parsing, and events are rare enough (deduplicated or
 * per connection) that the unused bytes do not matter.
 */
#ifndef SOCKGUARD_TRACE_H
#define SOCKGUARD_TRACE_H

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define SG_AF_INET 2
#define SG_AF_INET6 10
#define SG_IPPROTO_TCP 6
#define SG_KEY_MAX 64
#define SG_STACK_DEPTH 8

enum sg_event_type {
	SG_EV_UPDATE = 1,     /* sockhash update returned (aux = flags, ret = 0 / -errno) */
	SG_EV_PSOCK_DROP = 2, /* sk_psock_drop entered; stack[] holds the callers */
	SG_EV_RECV = 3,       /* recvmsg on a TCP socket (aux = sk_prot->recvmsg, ret = length) */
	SG_EV_STATE = 4,      /* inet_sock_set_state (state_old -> state_new) */
	SG_EV_DESTROY = 5,    /* tcp_destroy_sock */
};

/* Which program variant produced the event (tells operators what is attached). */
enum sg_source {
	SG_SRC_KPROBE = 1,
	SG_SRC_FENTRY = 2,
	SG_SRC_TP_BTF = 3,
	SG_SRC_RAW_TP = 4,
};

struct sg_event {
	__u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cookie;       /* socket cookie (0 when the kernel has not assigned one) */
	__u64 netns;        /* netns inode of the socket */
	__u32 type;         /* enum sg_event_type */
	__u32 pid;          /* tgid of the current task (0 in softirq is normal too) */
	__u32 tid;
	__s32 ret;
	char comm[16];
	__u16 family;       /* AF_INET / AF_INET6 */
	__u16 sport;        /* local port, host order (inet_sport) */
	__u16 dport;        /* remote port, host order */
	__u8 state_old;
	__u8 state_new;     /* for non-STATE events: the socket's current state */
	__u8 saddr[16];     /* local address (IPv4 in the first 4 bytes) */
	__u8 daddr[16];     /* remote address */
	__u64 aux;
	__u32 map_id;
	__u32 key_size;
	char map_name[16];
	__u8 key[SG_KEY_MAX];
	__u64 stack[SG_STACK_DEPTH];
	__u32 source;       /* enum sg_source */
	__u32 _pad;
};

/* Fill the header and the socket's identity from a kernel `struct sock *`. */
static __always_inline void sg_fill_sock(struct sg_event *ev, const struct sock *sk, __u32 type)
{
	__u64 id = bpf_get_current_pid_tgid();

	ev->ts_ns = bpf_ktime_get_ns();
	ev->type = type;
	ev->pid = id >> 32;
	ev->tid = (__u32)id;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	if (!sk)
		return;
	ev->cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	ev->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	ev->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	ev->state_new = BPF_CORE_READ(sk, __sk_common.skc_state);
	/* inet_sport, not skc_num: skc_num is zeroed when a closing socket
	 * releases its port (inet_put_port), before CLOSE and destroy fire. */
	ev->sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	ev->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (ev->family == SG_AF_INET6) {
		BPF_CORE_READ_INTO(&ev->saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&ev->daddr, sk, __sk_common.skc_v6_daddr);
	} else {
		BPF_CORE_READ_INTO((__be32 *)ev->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__be32 *)ev->daddr, sk, __sk_common.skc_daddr);
	}
}

/* A TCP socket of family inet/inet6 (the only ones sockguard cares about). */
static __always_inline int sg_is_tcp(const struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	if (family != SG_AF_INET && family != SG_AF_INET6)
		return 0;
	return BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol) == SG_IPPROTO_TCP;
}

#endif /* SOCKGUARD_TRACE_H */
