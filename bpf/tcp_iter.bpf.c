// SPDX-License-Identifier: GPL-2.0
/*
 * tcp_iter: every TCP socket of one network namespace, as sock_diag would
 * report it, plus what sock_diag cannot tell: the socket's receive path
 * (sk_prot->recvmsg, sock_state.h) and whether its process closed it.
 *
 * iter/tcp walks the namespace of the process that created the iterator fd
 * (bpf_iter_init_seq_net takes current->nsproxy->net_ns at bpf_iter_create),
 * so userspace enters each namespace before creating one.  Listeners are left
 * out, like sockguard's sock_diag dump.  Timewait and request socks are not
 * full sockets (the bpf_iter_tcp selftest tells them apart with
 * bpf_skc_to_*): for them only sock_common is read, and their state, uid and
 * inode are reported the way inet_twsk_diag_fill / inet_req_diag_fill do.
 *
 * The record layout is mirrored by sockguard/tcp_iter.py (RECORD).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "sock_state.h"

#define AF_INET 2
#define AF_INET6 10

#define TCP_SYN_RECV 3
#define TCP_TIME_WAIT 6
#define TCP_LISTEN 10
#define TCP_NEW_SYN_RECV 12

#define REC_FULL 0x1     /* a full socket (struct tcp_sock) */
#define REC_TIMEWAIT 0x2 /* an inet_timewait_sock */
#define REC_REQUEST 0x4  /* a request sock (NEW_SYN_RECV) */
#define REC_DEAD 0x8     /* full socket with SOCK_DEAD: its process closed it */

char _license[] SEC("license") = "GPL";

struct tcp_record {
	__u64 cookie;
	__u64 netns_ino;
	__u64 ino;       /* sock_i_ino(): 0 without a struct socket */
	__u32 uid;
	__u16 family;
	__u8 state;      /* as sock_diag reports it (tw_substate, SYN_RECV for requests) */
	__u8 flags;      /* REC_* */
	__u8 saddr[16];  /* local: skc_rcv_saddr (first 4 bytes) or skc_v6_rcv_saddr */
	__u8 daddr[16];  /* remote: skc_daddr or skc_v6_daddr */
	__u16 sport;     /* host order (skc_num) */
	__u16 dport;     /* host order */
	__u8 recv;       /* RECV_* (full sockets only) */
	__u8 _pad[11];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tcp_record);
} scratch SEC(".maps");

static __always_inline __u64 sock_ino(struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	struct socket_alloc *sa;

	if (!sock)
		return 0;
	sa = container_of(sock, struct socket_alloc, socket);
	return BPF_CORE_READ(sa, vfs_inode.i_ino);
}

SEC("iter/tcp")
int dump_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct seq_file *seq = ctx->meta->seq;
	struct tcp_timewait_sock *tw;
	struct tcp_record *rec;
	struct tcp_sock *tp;
	__u32 zero = 0;
	__u16 family;
	__u8 state;

	if (!skc)
		return 0;
	family = BPF_CORE_READ(skc, skc_family);
	state = BPF_CORE_READ(skc, skc_state);
	if (state == TCP_LISTEN || (family != AF_INET && family != AF_INET6))
		return 0;

	rec = bpf_map_lookup_elem(&scratch, &zero);
	if (!rec)
		return 0;
	__builtin_memset(rec, 0, sizeof(*rec));

	rec->cookie = bpf_get_socket_cookie(skc);
	rec->family = family;
	rec->netns_ino = BPF_CORE_READ(skc, skc_net.net, ns.inum);
	rec->sport = BPF_CORE_READ(skc, skc_num);
	rec->dport = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&rec->saddr, skc, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&rec->daddr, skc, skc_v6_daddr);
	} else {
		BPF_CORE_READ_INTO((__be32 *)rec->saddr, skc, skc_rcv_saddr);
		BPF_CORE_READ_INTO((__be32 *)rec->daddr, skc, skc_daddr);
	}

	tp = bpf_skc_to_tcp_sock(skc);
	if (tp) {
		struct sock *sk = (struct sock *)tp;

		rec->flags = REC_FULL | (sock_dead(sk) ? REC_DEAD : 0);
		rec->uid = ctx->uid;
		rec->ino = sock_ino(sk);
		rec->recv = recv_path(sk);
	} else if (state == TCP_TIME_WAIT) {
		/* inet_diag reports a timewait sock by its tw_substate (FIN_WAIT2 or TIME_WAIT) */
		rec->flags = REC_TIMEWAIT;
		tw = bpf_skc_to_tcp_timewait_sock(skc);
		if (tw)
			state = BPF_CORE_READ(tw, tw_sk.tw_substate);
	} else if (state == TCP_NEW_SYN_RECV) {
		rec->flags = REC_REQUEST;
		state = TCP_SYN_RECV; /* inet_req_diag_fill */
	}
	rec->state = state;

	bpf_seq_write(seq, rec, sizeof(*rec));
	return 0;
}
