/* SPDX-License-Identifier: GPL-2.0 */
/*
 * entry_record.h: one record per sockhash/sockmap entry, written by both entry
 * sources (sockmap_iter.bpf.c, sockhash_lookup.bpf.c; sockguard/sockmap_iter.py
 * RECORD decodes it), and the in-kernel judgement of a healthy entry.
 *
 * Nearly every entry of a real node is healthy, and its own socket proves it:
 * alive (not SOCK_DEAD), in a state that owns a connection, not reading with
 * plain tcp_recvmsg, and its tuple is the one the key describes.  With
 * sg_config.judge set (userspace does so for every layout sg_config.key_form can
 * describe), such an entry is only counted; a record goes to userspace for
 * every other entry.
 */
#ifndef SOCKGUARD_ENTRY_RECORD_H
#define SOCKGUARD_ENTRY_RECORD_H

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include "sock_state.h"

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

/* include/net/tcp_states.h: the states in which a full socket owns its connection. */
static __always_inline bool sg_owner_state(__u8 state)
{
	return state == 1 /* ESTABLISHED */ || state == 4 /* FIN_WAIT1 */ ||
	       state == 5 /* FIN_WAIT2 */ || state == 8 /* CLOSE_WAIT */ ||
	       state == 9 /* LAST_ACK */ || state == 11 /* CLOSING */;
}

/*
 * Byte stores at offsets read from sg_config: .rodata is frozen, so the
 * verifier knows each offset as a constant (a23740ec43ba, "bpf: Track contents
 * of read-only maps as scalars") and every store has a fixed stack offset; the
 * mask only keeps a bad offset inside the key rather than failing the load.
 */
static __always_inline void sg_put_addr(__u8 *k, __u8 at, const __u8 *addr, int len)
{
	int i;

#pragma unroll
	for (i = 0; i < 16; i++)
		if (i < len)
			k[(at + i) & (KEY_MAX - 1)] = addr[i];
}

static __always_inline void sg_put_port(__u8 *k, __u8 at, __u16 port)
{
	bool big = sg_config.key_form.port_big_endian;

	k[at & (KEY_MAX - 1)] = big ? port >> 8 : port & 0xff;
	k[(at + 1) & (KEY_MAX - 1)] = big ? port & 0xff : port >> 8;
}

/*
 * The key the map's layout stores for the socket a record describes
 * (sg_config.key_form), every other byte zero; IPv4-mapped IPv6 sockets as IPv4.
 */
static __always_inline bool sg_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline void sg_key_of_record(const struct record *rec, __u32 *words)
{
	const volatile struct sg_key_form *f = &sg_config.key_form;
	const __u32 *l = (const __u32 *)rec->saddr, *r = (const __u32 *)rec->daddr;
	__u8 *k = (__u8 *)words;

	__builtin_memset(words, 0, KEY_MAX);
	if (rec->family == AF_INET6 && !(sg_mapped(l) && sg_mapped(r))) {
		k[f->family & (KEY_MAX - 1)] = f->family_v6;
		sg_put_addr(k, f->remote_addr, rec->daddr, 16);
		sg_put_addr(k, f->local_addr, rec->saddr, 16);
	} else if (rec->family == AF_INET6) { /* v4-mapped: the address is in the last 4 bytes */
		k[f->family & (KEY_MAX - 1)] = f->family_v4;
		sg_put_addr(k, f->remote_addr, rec->daddr + 12, 4);
		sg_put_addr(k, f->local_addr, rec->saddr + 12, 4);
	} else {
		k[f->family & (KEY_MAX - 1)] = f->family_v4;
		sg_put_addr(k, f->remote_addr, rec->daddr, 4);
		sg_put_addr(k, f->local_addr, rec->saddr, 4);
	}
	sg_put_port(k, f->remote_port, rec->dport);
	sg_put_port(k, f->local_port, rec->sport);
}

/* Whether the entry whose record this is is healthy (see the top of this file). */
static __always_inline bool sg_healthy(const struct record *rec, __u8 recv_tcp)
{
	__u32 want[KEY_MAX / 4];
	const __u32 *got = (const __u32 *)rec->key;
	__u32 diff = 0;
	int i;

	if (!(rec->flags & REC_HAS_SOCKET) || (rec->flags & (REC_DEAD | REC_TUPLE_ONLY)))
		return false;
	if (!sg_owner_state(rec->state) || rec->recv == recv_tcp)
		return false;
	if (rec->key_len != sg_config.key_size || (rec->family != AF_INET && rec->family != AF_INET6))
		return false;
	sg_key_of_record(rec, want);
	/* both zero past the key: the sources copy key_len bytes into a zeroed key */
	for (i = 0; i < KEY_MAX / 4; i++)
		diff |= want[i] ^ got[i];
	return diff == 0;
}

#endif
