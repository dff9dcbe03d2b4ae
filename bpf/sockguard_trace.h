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

/*
 * Kernel-side filter (the daemon's mode): the key the audited map's layout
 * would store for a socket, looked up in `watched`, a hash of the keys
 * userspace last read from the audited maps (sockguard/tracer.py,
 * WatchedKeys).  Only the Cilium layout is known here (DESIGN.md section 2):
 * written from the peer's point of view, sip = remote ip, dip = local ip,
 * sport = remote port, dport = local port, family 1 (IPv4, also for an
 * AF_INET6 socket whose two addresses are IPv4-mapped) or 2 (IPv6), ports
 * as big-endian u16 in the low-addressed bytes of a u32.  Another layout is
 * never filtered: userspace then loads with filter_watched = 0.
 *
 * A socket whose key is not watched is not forgotten: its would-be event is
 * parked in the `pending` array, in the slot its key hashes to (the next
 * socket hashing there overwrites it), and when a refresh adds that key to
 * `watched` userspace takes it from there (a connection
 * shorter than the refresh period, or a key injected just before the event).
 *
 * Objects that define SG_WATCHED get the maps; userspace creates `watched`
 * once and hands the same fd to each object (bpf_map__reuse_fd).
 */
#define SG_LAYOUT_NONE 0
#define SG_LAYOUT_CILIUM 1
#define SG_WATCHED_MAX 262144
#define SG_PENDING_BITS 13 /* 8192 slots */

struct sg_cilium_key {
	__u32 sip[4];
	__u32 dip[4];
	__u8 family;
	__u8 pad[3];
	__u32 sport;
	__u32 dport;
};

_Static_assert(sizeof(struct sg_cilium_key) == 44, "Cilium's sock_key is 44 bytes");

/* A parked event: a direct-mapped slot (sg_slot of its key), overwritten by the
 * next socket hashing there.  A plain array, not an LRU hash: an LRU that is
 * always full (every new socket parks) pays an eviction on every update. */
struct sg_parked {
	struct sg_cilium_key key;
	__u32 _pad;
	struct sg_event ev;
};

#ifdef SG_WATCHED
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_WATCHED_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_cilium_key);
	__type(value, __u32);  /* id of the (first) audited map holding the key */
} watched SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << SG_PENDING_BITS);
	__type(key, __u32);
	__type(value, struct sg_parked);
} pending SEC(".maps");
#endif

/* The pending slot of a key; sockguard/tracer.py (pending_slot) computes the same. */
static __always_inline __u32 sg_slot(const struct sg_cilium_key *k)
{
	__u32 h;

	h = k->sip[0] ^ k->sip[1] ^ k->sip[2] ^ k->sip[3];
	h = h * 0x9E3779B1u ^ (k->dip[0] ^ k->dip[1] ^ k->dip[2] ^ k->dip[3]);
	h = h * 0x9E3779B1u ^ (k->sport | (k->dport << 16) | k->family);
	h *= 0x9E3779B1u;
	return h >> (32 - SG_PENDING_BITS);
}

static __always_inline int sg_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/* The Cilium key stored for `sk` (its peer's point of view); 0 when it has none. */
static __always_inline int sg_cilium_key_of(const struct sock *sk, struct sg_cilium_key *k)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	__u16 lport = BPF_CORE_READ((struct inet_sock *)sk, inet_sport); /* network order */
	__u16 rport = BPF_CORE_READ(sk, __sk_common.skc_dport);          /* network order */
	__u32 l6[4] = {}, r6[4] = {};

	__builtin_memset(k, 0, sizeof(*k));
	if (family == SG_AF_INET6) {
		BPF_CORE_READ_INTO(&l6, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&r6, sk, __sk_common.skc_v6_daddr);
		if (sg_v4_mapped(l6) && sg_v4_mapped(r6)) {
			k->sip[0] = r6[3];
			k->dip[0] = l6[3];
			k->family = 1;
		} else {
			__builtin_memcpy(k->sip, r6, sizeof(r6));
			__builtin_memcpy(k->dip, l6, sizeof(l6));
			k->family = 2;
		}
	} else if (family == SG_AF_INET) {
		k->sip[0] = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		k->dip[0] = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		k->family = 1;
	} else {
		return 0;
	}
	/* a u16 in network order stored into a little-endian u32: its bytes land in
	 * the low-addressed half, as Cilium's `bpf_ntohl(local_port) >> 16` does */
	k->sport = rport;
	k->dport = lport;
	return 1;
}

#ifdef SG_WATCHED
/* Park an event under `k` in its pending slot, filled in place by `fill_stmt` (on `ev`). */
#define SG_PARK(k, fill_stmt)                                                   \
	do {                                                                    \
		__u32 __slot = sg_slot(k);                                      \
		struct sg_parked *__p = bpf_map_lookup_elem(&pending, &__slot); \
		if (__p) {                                                      \
			struct sg_event *ev = &__p->ev;                         \
			__p->key = *(k);                                        \
			fill_stmt;                                              \
		}                                                               \
	} while (0)
#endif

#endif /* SOCKGUARD_TRACE_H */
