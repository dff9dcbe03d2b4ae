/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sock_state.h: what sockguard's iterators read about one full socket beyond
 * its tuple: whether its process has closed it (SOCK_DEAD) and which receive
 * path its protocol ops point to.  Shared by sockmap_iter.bpf.c and
 * tcp_iter.bpf.c; each object gets its own copy of the config below.
 */
#ifndef SOCKGUARD_SOCK_STATE_H
#define SOCKGUARD_SOCK_STATE_H

#include "vmlinux.h"
#include <bpf/bpf_core_read.h>

/* Receive path codes (sockguard/compact.py RECV_*). */
#define RECV_UNKNOWN 0
#define RECV_TCP 1   /* sk_prot->recvmsg == tcp_recvmsg: plain TCP stack */
#define RECV_BPF 2   /* tcp_bpf_recvmsg or tcp_bpf_recvmsg_parser: a psock's proto */
#define RECV_OTHER 3 /* anything else (kTLS, ...) while both above are known */

/*
 * Where a map's key layout puts the owning socket's fields (byte offsets into
 * the key; sockguard/core/layout.py KernelKeyForm): entry_record.h writes the
 * key a healthy entry would have from its socket with it.
 */
struct sg_key_form {
	__u8 remote_addr;     /* 16 bytes; IPv4 in the first 4 */
	__u8 local_addr;
	__u8 remote_port;     /* a u16 */
	__u8 local_port;
	__u8 family;          /* one byte: family_v4 or family_v6 */
	__u8 family_v4;
	__u8 family_v6;
	__u8 port_big_endian; /* else little-endian */
};

/*
 * Set by userspace before load (sockguard/recvsyms.py): the addresses of the
 * receive functions, read from /proc/kallsyms; 0 where a symbol is missing,
 * ambiguous or hidden (kptr_restrict), which yields RECV_UNKNOWN.  One struct,
 * so that the .rodata layout is fixed for the Python side.
 */
struct sg_config {
	__u64 tcp_recvmsg;
	__u64 tcp_bpf_recvmsg;
	__u64 tcp_bpf_recvmsg_parser;
	__u32 key_size; /* the entry sources only: the map's key size */
	__u32 judge;    /* the entry sources only: count healthy entries (entry_record.h) */
	struct sg_key_form key_form; /* the entry sources only, when judging */
};

const volatile struct sg_config sg_config = {};

/* The RECV_* code of a receive function's address (`sk->sk_prot->recvmsg`). */
static __always_inline __u8 recv_code(__u64 fn)
{
	__u64 tcp = sg_config.tcp_recvmsg, bpf = sg_config.tcp_bpf_recvmsg;
	__u64 parser = sg_config.tcp_bpf_recvmsg_parser;

	if (!fn)
		return RECV_UNKNOWN;
	if (tcp && fn == tcp)
		return RECV_TCP;
	if ((bpf && fn == bpf) || (parser && fn == parser))
		return RECV_BPF;
	return tcp && bpf ? RECV_OTHER : RECV_UNKNOWN;
}

static __always_inline __u8 recv_path(struct sock *sk)
{
	return recv_code((__u64)BPF_CORE_READ(sk, __sk_common.skc_prot, recvmsg));
}

/*
 * SOCK_DEAD is set by sock_orphan() when the owning process closes the
 * socket (and for never-accepted children of a closed listener).  sk_socket
 * == NULL is no substitute: a passively opened child is in Cilium's map
 * (PASSIVE_ESTABLISHED_CB) before accept() grafts its struct socket.  The
 * bit number comes from the kernel's own enum via CO-RE, sk_flags is
 * __sk_common.skc_flags on every kernel with BTF.  Only valid for full
 * sockets: for timewait/request socks that union holds other pointers.
 */
static __always_inline bool sock_dead(struct sock *sk)
{
	unsigned long flags = BPF_CORE_READ(sk, __sk_common.skc_flags);

	return flags & (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DEAD));
}

#endif
