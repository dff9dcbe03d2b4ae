/* SPDX-License-Identifier: GPL-2.0 */
/*
 * entry_record.h: one record per sockhash/sockmap entry, written by both entry
 * sources (sockmap_iter.bpf.c, sockhash_lookup.bpf.c; sockguard/sockmap_iter.py
 * RECORD decodes it), and the in-kernel judgement of a healthy entry.
 *
 * Nearly every entry of a real node is healthy, and its own socket proves it:
 * alive (not SOCK_DEAD), in a state that owns a connection, not reading with
 * plain tcp_recvmsg, and its tuple is the one the key describes.  With
 * sg_config.judge set (userspace does so for Cilium's 44-byte layout), such an
 * entry is only counted; a record goes to userspace for every other entry.
 */
#ifndef SOCKGUARD_ENTRY_RECORD_H
#define SOCKGUARD_ENTRY_RECORD_H

#include "vmlinux.h"
#include <bpf/bpf_endian.h>

#define KEY_MAX 64
#define AF_INET 2
#define AF_INET6 10

#define REC_HAS_SOCKET 0x1
#define REC_DEAD 0x2       /* SOCK_DEAD: closed by its process, the entry outlived close */
#define REC_TUPLE_ONLY 0x4 /* the tc lookup without BTF: cookie, netns, dead, recv unknown */
#define REC_HEALTHY 0x8    /* tc lookup: judged healthy in the kernel (the iterator writes none) */
#define REC_SUMMARY 0x10   /* iterator: the walk's last record; cookie = healthy entries */

struct record {
	__u8 key[KEY_MAX];
	__u64 cookie;
	__u64 netns_ino;
	__u32 key_len;
	__u16 family;    /* AF_INET / AF_INET6 as the kernel stores it */
	__u8 state;      /* skc_state, include/net/tcp_states.h */
	__u8 flags;      /* REC_* */
	__u8 saddr[16];  /* local: skc_rcv_saddr (first 4 bytes) or skc_v6_rcv_saddr */
	__u8 daddr[16];  /* remote: skc_daddr or skc_v6_daddr */
	__u16 sport;     /* local port, host order (skc_num) */
	__u16 dport;     /* remote port, host order (skc_dport converted) */
	__u8 recv;       /* RECV_* of sock_state.h */
	__u8 _pad[3];
};

/*
 * Never called, so never loaded: clang writes a struct into the object's BTF
 * only when a global, a map or a function refers to it, and userspace checks
 * its copy of the record layout against that BTF (tests/test_bpf_layouts.py).
 */
__noinline int sg_entry_record_layout(struct record *rec)
{
	return rec != 0;
}

/* Cilium's struct sock_key (44 bytes); see sockguard/layout.py CILIUM. */
struct sg_entry_key {
	__u32 sip[4];
	__u32 dip[4];
	__u8 family;     /* 1 = IPv4, 2 = IPv6 */
	__u8 pad[3];
	__u32 sport;     /* a network-order u16 in the low-addressed half */
	__u32 dport;
};

_Static_assert(sizeof(struct sg_entry_key) == 44, "Cilium's sock_key is 44 bytes");

/* include/net/tcp_states.h: the states in which a full socket owns its connection. */
static __always_inline bool sg_owner_state(__u8 state)
{
	return state == 1 /* ESTABLISHED */ || state == 4 /* FIN_WAIT1 */ ||
	       state == 5 /* FIN_WAIT2 */ || state == 8 /* CLOSE_WAIT */ ||
	       state == 9 /* LAST_ACK */ || state == 11 /* CLOSING */;
}

/*
 * The key Cilium stores for the socket a record describes: its peer's point
 * of view (sip = remote, dip = local), IPv4-mapped IPv6 sockets as IPv4.
 */
static __always_inline void sg_key_of_record(const struct record *rec, struct sg_entry_key *k)
{
	const __u32 *l = (const __u32 *)rec->saddr, *r = (const __u32 *)rec->daddr;

	__builtin_memset(k, 0, sizeof(*k));
	if (rec->family == AF_INET6 &&
	    !(l[0] == 0 && l[1] == 0 && l[2] == bpf_htonl(0xffff) &&
	      r[0] == 0 && r[1] == 0 && r[2] == bpf_htonl(0xffff))) {
		k->sip[0] = r[0]; k->sip[1] = r[1]; k->sip[2] = r[2]; k->sip[3] = r[3];
		k->dip[0] = l[0]; k->dip[1] = l[1]; k->dip[2] = l[2]; k->dip[3] = l[3];
		k->family = 2;
	} else {
		/* AF_INET: the address is in the first word; v4-mapped: in the last */
		int w = rec->family == AF_INET6 ? 3 : 0;

		k->sip[0] = r[w & 3];
		k->dip[0] = l[w & 3];
		k->family = 1;
	}
	k->sport = bpf_htons(rec->dport);
	k->dport = bpf_htons(rec->sport);
}

/* Whether the entry whose record this is is healthy (see the top of this file). */
static __always_inline bool sg_healthy(const struct record *rec, __u8 recv_tcp)
{
	struct sg_entry_key k;
	const __u32 *a = (const __u32 *)&k, *b = (const __u32 *)rec->key;
	__u32 diff = 0;
	int i;

	if (!(rec->flags & REC_HAS_SOCKET) || (rec->flags & (REC_DEAD | REC_TUPLE_ONLY)))
		return false;
	if (!sg_owner_state(rec->state) || rec->recv == recv_tcp)
		return false;
	if (rec->key_len != sizeof(k) || (rec->family != AF_INET && rec->family != AF_INET6))
		return false;
	sg_key_of_record(rec, &k);
	for (i = 0; i < sizeof(k) / 4; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

#endif
