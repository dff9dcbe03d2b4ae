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
	SG_EV_RESET = 6,      /* inet_sk_error_report in CLOSE (ret = -sk_err) */
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

/*
 * A field of a kernel object.  tp_btf programs get `struct sock *` as a BTF
 * pointer they may load from directly (the verifier turns the load into a
 * PROBE_MEM load: a few ns); kprobe and raw_tp programs get a plain number
 * and need bpf_probe_read_kernel (BPF_CORE_READ), a helper call of ~50 ns
 * here, ~20 of them per event before this existed (benchmarks/README.md).
 * `typed` is a constant in every caller (all always_inline), so clang keeps
 * one branch and the verifier never sees a direct load in an untyped program.
 */
#define SG_READ(typed, p, field) ((typed) ? (p)->field : BPF_CORE_READ(p, field))

/* Copy an in6_addr field: direct or through bpf_probe_read_kernel, as SG_READ. */
#define SG_READ_ADDR6(typed, dst, sk, field)                                    \
	do {                                                                    \
		if (typed)                                                      \
			__builtin_memcpy(dst, &(sk)->field, 16);                \
		else                                                            \
			BPF_CORE_READ_INTO(dst, sk, field);                     \
	} while (0)

/*
 * The local port in network order: skc_num (typed: a direct load) while the
 * socket holds its port, else inet_sport.  A closing socket releases its
 * port (inet_put_port zeroes skc_num) in tcp_set_state before
 * inet_sk_state_store fires inet_sock_set_state, so at CLOSE and at destroy
 * only inet_sport is left.  It lives in struct inet_sock, beyond struct
 * sock, where the verifier does not let a typed `struct sock *` load
 * (btf_struct_access).  A typed program gets it through
 * bpf_skc_to_tcp_sock (kernel >= 5.9), whose result it may load from: a
 * trivial helper, where bpf_probe_read_kernel cost ~35 ns more per death
 * here (benchmarks/README.md).  Elsewhere, a probe read.
 */
static __always_inline __u16 sg_local_port(const struct sock *sk, const bool typed)
{
	__u16 num = SG_READ(typed, sk, __sk_common.skc_num);
	struct tcp_sock *tp;

	if (num)
		return bpf_htons(num);
	if (typed && bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_skc_to_tcp_sock)) {
		tp = bpf_skc_to_tcp_sock((void *)sk);
		if (tp)
			return tp->inet_conn.icsk_inet.inet_sport;
	}
	return BPF_CORE_READ((struct inet_sock *)sk, inet_sport);
}

/* The inode number of the socket's network namespace. */
static __always_inline __u32 sg_netns(const struct sock *sk, const bool typed)
{
	return typed ? sk->__sk_common.skc_net.net->ns.inum
		     : BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* Fill the header and the socket's identity from a kernel `struct sock *`. */
static __always_inline void sg_fill_sock(struct sg_event *ev, const struct sock *sk, __u32 type,
					 const bool typed)
{
	__u64 id = bpf_get_current_pid_tgid();

	ev->ts_ns = bpf_ktime_get_ns();
	ev->type = type;
	ev->pid = id >> 32;
	ev->tid = (__u32)id;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	if (!sk)
		return;
	ev->cookie = SG_READ(typed, sk, __sk_common.skc_cookie.counter);
	ev->netns = sg_netns(sk, typed);
	ev->family = SG_READ(typed, sk, __sk_common.skc_family);
	ev->state_new = SG_READ(typed, sk, __sk_common.skc_state);
	ev->sport = bpf_ntohs(sg_local_port(sk, typed));
	ev->dport = bpf_ntohs(SG_READ(typed, sk, __sk_common.skc_dport));
	if (ev->family == SG_AF_INET6) {
		SG_READ_ADDR6(typed, &ev->saddr, sk, __sk_common.skc_v6_rcv_saddr);
		SG_READ_ADDR6(typed, &ev->daddr, sk, __sk_common.skc_v6_daddr);
	} else {
		*(__be32 *)ev->saddr = SG_READ(typed, sk, __sk_common.skc_rcv_saddr);
		*(__be32 *)ev->daddr = SG_READ(typed, sk, __sk_common.skc_daddr);
	}
}

/*
 * An event of `sk` reserved in ring buffer `rb`, zeroed, its header and the
 * socket's identity filled, `cookie` (when not 0: bpf_get_socket_cookie's,
 * which tp_btf programs call) over the one read from the socket, and
 * `source`; the caller adds what its type carries and submits it.  NULL
 * when the buffer is full.
 */
static __always_inline struct sg_event *sg_reserve(void *rb, const struct sock *sk, __u32 type,
						   __u64 cookie, __u32 source, const bool typed)
{
	struct sg_event *ev = bpf_ringbuf_reserve(rb, sizeof(*ev), 0);

	if (!ev)
		return NULL;
	__builtin_memset(ev, 0, sizeof(*ev));
	sg_fill_sock(ev, sk, type, typed);
	if (cookie)
		ev->cookie = cookie;
	ev->source = source;
	return ev;
}

/* A TCP socket of family inet/inet6 (the only ones sockguard cares about). */
static __always_inline int sg_is_tcp(const struct sock *sk, const bool typed)
{
	__u16 family = SG_READ(typed, sk, __sk_common.skc_family);

	if (family != SG_AF_INET && family != SG_AF_INET6)
		return 0;
	if (typed)
		return BPF_CORE_READ_BITFIELD(sk, sk_protocol) == SG_IPPROTO_TCP;
	return BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol) == SG_IPPROTO_TCP;
}

/*
 * Kernel-side filter (the daemon's mode): a socket's filter key, its tuple
 * as its peer sees it (struct sg_tuple_key: sip = remote ip, dip = local ip,
 * sport = remote port, dport = local port, family 1 = IPv4, also for an
 * AF_INET6 socket whose two addresses are IPv4-mapped, 2 = IPv6, ports as
 * big-endian u16 in the low-addressed bytes of a u32), looked up in
 * `watched`, a hash of the audited maps' keys in that form
 * (sockguard/trace/watched.py, WatchedKeys).  No map layout is known here:
 * userspace turns each map key into its filter key (sockguard/core/layout.py,
 * FILTER_KEY and filter_key); for Cilium's sock_key the bytes are the same.
 *
 * In front of the hash sits `watched_bits`, one bit per key hash (2^17 bits,
 * 16 KiB): a socket whose bit is clear is not watched, and the program is
 * done without touching the hash.  Measured here (benchmarks/README.md) a
 * lookup in the hash costs ~450 ns under churn, almost all of it cache and
 * TLB misses (its bucket array is vmalloc'ed); the bitmap is small enough
 * for bpf_map_area_alloc to kmalloc it, and stays in cache.  Userspace sets
 * the bits of every key it watches; a bit shared by another key only costs
 * the hash lookup.
 *
 * A socket whose key is not watched is not forgotten: its would-be event is
 * parked in its object's `pending` array, in the slot its key hashes to (the
 * next socket hashing there overwrites it), and when a refresh adds that key
 * to `watched` userspace takes it from there and reports it late (a
 * connection shorter than the refresh period left its key behind, or a key
 * showed up just before the event).  Every unwatched close and receive
 * writes a slot, so the record is small (struct sg_parked, the tuple being
 * the key itself): a full struct sg_event, zeroed and filled, cost ~350 ns
 * more per close under churn, in cache misses.  A plain array, not an LRU
 * hash: an LRU that is always full pays an eviction per update.
 *
 * Whether the slot already holds this socket's event (every receive of a
 * long connection asks) is answered by `recent`, a small array that stays in
 * cache (128 entries, 9 KiB), entry = slot % 128, written by every park:
 * reading the `pending` slot itself, a cold line of a 900 KiB array for
 * every new socket, was ~130 ns of a ~270 ns receive under churn, where
 * the stores of a park cost little (benchmarks/README.md).  A park of slot s
 * overwrites entry s % 128, so an entry still naming this socket's event
 * means `pending` still holds it, unless userspace took it meanwhile (it
 * empties each slot it reads, at a refresh); a repeat in a new epoch
 * therefore reads the slot once and parks again if the event is gone.
 *
 * Objects that define SG_WATCHED get the maps; userspace creates `watched`
 * and `watched_bits` once and hands the same fds to each object
 * (bpf_map__reuse_fd); each has its own `pending` and `recent`.
 */
#define SG_WATCHED_MAX 262144
#define SG_WATCHED_BITS 17 /* 2^17 bits: 16 KiB */
#define SG_PENDING_BITS 13 /* 8192 slots */
#define SG_RECENT_BITS 7   /* 128 entries */

struct sg_tuple_key {
	__u32 sip[4];
	__u32 dip[4];
	__u8 family;
	__u8 pad[3];
	__u32 sport;
	__u32 dport;
};

_Static_assert(sizeof(struct sg_tuple_key) == 44, "the layout of Cilium's sock_key");

/* A parked event; sockguard/tracer.py (PARKED, parked_event) decodes it. */
struct sg_parked {
	struct sg_tuple_key key;
	__u8 type;          /* enum sg_event_type */
	__u8 state_old;
	__u8 state_new;
	__u8 source;        /* enum sg_source */
	__u64 ts_ns;
	__u64 cookie;
	__u64 aux;          /* as in struct sg_event */
	__u32 netns;        /* inode number (ns.inum is 32 bits) */
	__u32 pid;
	__u16 family;       /* the socket's (AF_INET6 for a v4-mapped key of family 1) */
	__u16 _pad;
	__u32 check;        /* (u32)cookie ^ key hash: a slot two CPUs wrote at once fails it */
	__s32 ret;
	char comm[16];
	__u32 epoch;        /* watched_bits' epoch when last written or refreshed */
};

_Static_assert(sizeof(struct sg_parked) == 112, "decoded by sockguard/tracer.py");

/* What a `pending` slot holds, as far as a repeat of the same event asks. */
struct sg_recent {
	struct sg_tuple_key key;
	__u8 type;
	__u8 _pad[3];
	__u32 epoch;        /* of the last park or refresh */
	__u32 _pad2;
	__u64 cookie;
	__u64 aux;
};

struct sg_watched_bits {
	__u32 epoch;        /* bumped by userspace at every refresh of the watched set */
	__u32 _pad;
	__u64 word[(1 << SG_WATCHED_BITS) / 64];
};

/*
 * Never called, so never loaded: clang writes a struct into the object's BTF
 * only when a global, a map or a function refers to it, and userspace checks
 * its copies of these layouts against that BTF (tests/test_bpf_layouts.py).
 */
__noinline int sg_trace_layouts(struct sg_event *ev, struct sg_parked *parked)
{
	return ev && parked;
}

#ifdef SG_WATCHED
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SG_WATCHED_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sg_tuple_key);
	__type(value, __u32);  /* id of the (first) audited map holding the key */
} watched SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sg_watched_bits);
} watched_bits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << SG_PENDING_BITS);
	__type(key, __u32);
	__type(value, struct sg_parked);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << SG_RECENT_BITS);
	__type(key, __u32);
	__type(value, struct sg_recent);
} recent SEC(".maps");
#endif

/* A key's hash; sockguard/tracer.py (key_hash) computes the same. */
static __always_inline __u32 sg_key_hash(const struct sg_tuple_key *k)
{
	__u32 h;

	h = k->sip[0] ^ k->sip[1] ^ k->sip[2] ^ k->sip[3];
	h = h * 0x9E3779B1u ^ (k->dip[0] ^ k->dip[1] ^ k->dip[2] ^ k->dip[3]);
	h = h * 0x9E3779B1u ^ (k->sport | (k->dport << 16) | k->family);
	return h * 0x9E3779B1u;
}

static __always_inline int sg_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/* The filter key of `sk` (its peer's point of view); 0 when it has none. */
static __always_inline int sg_tuple_key_of(const struct sock *sk, struct sg_tuple_key *k,
					    const bool typed)
{
	__u16 family = SG_READ(typed, sk, __sk_common.skc_family);
	__u16 lport = sg_local_port(sk, typed);                         /* network order */
	__u16 rport = SG_READ(typed, sk, __sk_common.skc_dport);        /* network order */
	__u32 l6[4] = {}, r6[4] = {};

	__builtin_memset(k, 0, sizeof(*k));
	if (family == SG_AF_INET6) {
		SG_READ_ADDR6(typed, &l6, sk, __sk_common.skc_v6_rcv_saddr);
		SG_READ_ADDR6(typed, &r6, sk, __sk_common.skc_v6_daddr);
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
		k->sip[0] = SG_READ(typed, sk, __sk_common.skc_daddr);
		k->dip[0] = SG_READ(typed, sk, __sk_common.skc_rcv_saddr);
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
/* Whether key `k` (of hash `hash`) is watched: its bit first, then the hash.
 * Sets *epoch to the refresh epoch (for sg_park). */
static __always_inline int sg_watched(const struct sg_tuple_key *k, __u32 hash, __u32 *epoch)
{
	__u32 zero = 0, bit = hash >> (32 - SG_WATCHED_BITS);
	struct sg_watched_bits *bits = bpf_map_lookup_elem(&watched_bits, &zero);

	*epoch = 0;
	if (bits) {
		*epoch = bits->epoch;
		if (!(bits->word[bit / 64] & (1ull << (bit % 64))))
			return 0;
	}
	return bpf_map_lookup_elem(&watched, k) != NULL;
}

static __always_inline int sg_key_eq(const struct sg_tuple_key *a,
				     const struct sg_tuple_key *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	__u32 diff = 0;
	int i;

	for (i = 0; i < sizeof(*a) / 4; i++)
		diff |= x[i] ^ y[i];
	return diff == 0;
}

/* Whether a parked record or a `recent` entry holds this event of this socket. */
#define SG_SAME_EVENT(x, k, type, cookie, aux)                                  \
	((x)->cookie == (cookie) && (x)->type == (type) && (x)->aux == (aux) &&   \
	 sg_key_eq(&(x)->key, (k)))

/*
 * Park an event of `sk` under its key `k` (of hash `hash`).  Helper calls
 * are what a park costs on a mitigated kernel (each returns through the
 * SRSO/retbleed return thunk: ~100 ns apiece on the development machine),
 * so the same socket's same event again (every receive of a long
 * connection) calls none and touches only `recent`: it refreshes the time
 * once per `epoch` (a refresh of the watched set, which drops parked events
 * older than the previous one), and tp_btf programs read pid and comm from
 * the BTF task (one call, not two).
 */
static __always_inline void sg_park(const struct sg_tuple_key *k, __u32 hash, __u32 epoch,
				    const struct sock *sk, __u32 type, int oldstate, int newstate,
				    __u64 aux, int ret, __u32 source, const bool typed)
{
	__u32 slot = hash >> (32 - SG_PENDING_BITS);
	__u32 ri = slot & ((1 << SG_RECENT_BITS) - 1);
	struct sg_parked *p = bpf_map_lookup_elem(&pending, &slot);
	struct sg_recent *r = bpf_map_lookup_elem(&recent, &ri);
	struct task_struct *task;
	__u64 cookie;

	if (!p || !r)
		return;
	cookie = SG_READ(typed, sk, __sk_common.skc_cookie.counter);
	if (SG_SAME_EVENT(r, k, type, cookie, aux)) {
		if (r->epoch == epoch)
			return;
		r->epoch = epoch;
		if (SG_SAME_EVENT(p, k, type, cookie, aux)) {
			p->epoch = epoch;
			p->ts_ns = bpf_ktime_get_ns();
			return;
		}
	}
	p->epoch = epoch;
	p->key = *k;
	p->type = type;
	p->state_old = type == SG_EV_STATE ? oldstate : 0;
	p->state_new = type == SG_EV_STATE ? newstate : SG_READ(typed, sk, __sk_common.skc_state);
	p->source = source;
	p->ts_ns = bpf_ktime_get_ns();
	p->cookie = cookie;
	p->aux = aux;
	p->netns = sg_netns(sk, typed);
	p->family = SG_READ(typed, sk, __sk_common.skc_family);
	p->check = (__u32)cookie ^ hash;
	p->ret = ret;
	if (typed) {
		task = bpf_get_current_task_btf();
		p->pid = task->tgid;
		__builtin_memcpy(p->comm, task->comm, sizeof(p->comm));
	} else {
		p->pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(p->comm, sizeof(p->comm));
	}
	r->key = *k;
	r->type = type;
	r->cookie = cookie;
	r->aux = aux;
	r->epoch = epoch;
}

/*
 * The filter for an event of `sk`: 1 when its filter key is watched (send the
 * event), 0 when it has no key or is not watched; an unwatched event is
 * parked when `park` is set.
 */
static __always_inline int sg_filter(const struct sock *sk, int park, __u32 type, int oldstate,
				     int newstate, __u64 aux, int ret, __u32 source,
				     const bool typed)
{
	struct sg_tuple_key key;
	__u32 hash, epoch;

	if (!sg_tuple_key_of(sk, &key, typed))
		return 0;
	hash = sg_key_hash(&key);
	if (sg_watched(&key, hash, &epoch))
		return 1;
	if (park)
		sg_park(&key, hash, epoch, sk, type, oldstate, newstate, aux, ret, source, typed);
	return 0;
}
#endif

#endif /* SOCKGUARD_TRACE_H */
