// SPDX-License-Identifier: GPL-2.0
/*
 * sockhash_lookup: which socket one sockhash/sockmap key points to, without an
 * iterator.
 *
 * Where iter/sockmap cannot load (kernels before 5.10, or a node whose policy
 * refuses map iterators), userspace still cannot look up the socket behind a
 * key of a 4-byte-value map (ENOSPC).  A SCHED_CLS program may: since 5.10
 * bpf_map_lookup_elem() on a sockmap/sockhash returns a referenced
 * `struct bpf_sock *` (net/core/sock_map.c, sock_map_lookup /
 * sock_hash_lookup, reachable from tc since "bpf, sockmap: Allow
 * sockmap/sockhash lookups from BPF").  Userspace runs the program with
 * BPF_PROG_TEST_RUN, up to BATCH keys per run: the test packet carries an
 * Ethernet header, 2 bytes of padding and then `struct record`s (the same
 * layout as sockmap_iter's) whose keys the program reads and whose other
 * fields it fills, as many as the packet holds; the packet comes back as the
 * run's data_out.  A record the program did not reach keeps key_len 0, which
 * userspace checks.  (A test packet is at most a page minus the skb's head-
 * and tailroom, bpf_prog_test_run_skb(): 24 records of 128 bytes fit.)
 *
 * Two programs, the loader takes the first that the kernel accepts:
 * - lookup_btf also casts the socket to its kernel type with
 *   bpf_skc_to_tcp_sock() (networking programs since 5.10, for CAP_PERFMON)
 *   and reads what sockmap_iter reads: cookie field, netns, SOCK_DEAD, receive
 *   path.  The cookie is the skc_cookie field, 0 until something generated it
 *   (sock_diag does for every socket it lists): userspace scans first.
 * - lookup_tuple reads only the struct bpf_sock fields: family, state and
 *   the tuple (REC_TUPLE_ONLY).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "sock_state.h"
#include "entry_record.h"

/* The records start 16 bytes in: an Ethernet header (14, the least a test run
 * takes) and 2 bytes that align them for 8-byte loads. */
#define RECORD_OFF 16
#define BATCH 24

char _license[] SEC("license") = "GPL";

/* Replaced before load by the map to read (bpf_map__reuse_fd takes its real sizes). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} target SEC(".maps");

/*
 * Judging (sg_config.judge): a healthy entry is counted here, by its socket's
 * netns inode, and its record needs no reading; the run's return value is the
 * number of records userspace must read (not healthy), so a batch of healthy
 * entries costs userspace nothing but the run.  Userspace empties the map
 * before a read and drains it after.  A netns the map cannot take (full) is
 * left to userspace: the record is not marked healthy.
 */
#define HEALTHY_NETNS_MAX 8192

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HEALTHY_NETNS_MAX);
	__type(key, __u64);
	__type(value, __u64);
} healthy SEC(".maps");

static __always_inline bool count_healthy(__u64 netns_ino)
{
	__u64 one = 1, *n = bpf_map_lookup_elem(&healthy, &netns_ino);

	if (n) {
		__sync_fetch_and_add(n, 1);
		return true;
	}
	if (!bpf_map_update_elem(&healthy, &netns_ino, &one, BPF_NOEXIST))
		return true;
	n = bpf_map_lookup_elem(&healthy, &netns_ino); /* inserted meanwhile, or full */
	if (!n)
		return false;
	__sync_fetch_and_add(n, 1);
	return true;
}

static __always_inline struct record *packet_record(struct __sk_buff *skb, __u32 i)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct record *rec;

	if (i >= BATCH) /* bounds the packet offset for the verifier */
		return NULL;
	rec = data + RECORD_OFF + i * sizeof(struct record);
	if ((void *)(rec + 1) > data_end)
		return NULL;
	return rec;
}

static __always_inline void copy_tuple(struct record *rec, struct bpf_sock *sk)
{
	/*
	 * dst_port: a 4-byte load is accepted by every kernel (the field became
	 * __be16 + 16 bits of padding in 5.18, 4421a582718a); its low 16 bits
	 * hold the port in network order.
	 */
	__u32 dport = *(volatile __u32 *)&sk->dst_port;

	rec->family = sk->family;
	rec->state = sk->state;
	rec->sport = sk->src_port;
	rec->dport = bpf_ntohs((__u16)dport);
	if (rec->family == AF_INET6) {
		/* ctx fields: one constant-offset load each (no pointer arithmetic on a sock) */
		((__u32 *)rec->saddr)[0] = sk->src_ip6[0];
		((__u32 *)rec->saddr)[1] = sk->src_ip6[1];
		((__u32 *)rec->saddr)[2] = sk->src_ip6[2];
		((__u32 *)rec->saddr)[3] = sk->src_ip6[3];
		((__u32 *)rec->daddr)[0] = sk->dst_ip6[0];
		((__u32 *)rec->daddr)[1] = sk->dst_ip6[1];
		((__u32 *)rec->daddr)[2] = sk->dst_ip6[2];
		((__u32 *)rec->daddr)[3] = sk->dst_ip6[3];
	} else {
		*(__u32 *)rec->saddr = sk->src_ip4;
		*(__u32 *)rec->daddr = sk->dst_ip4;
	}
}

static __always_inline int lookup(struct __sk_buff *skb, __u32 i, bool btf)
{
	__u8 key[KEY_MAX];
	struct record *rec = packet_record(skb, i);
	struct bpf_sock *sk;

	if (!rec)
		return -1;
	__builtin_memcpy(key, rec->key, KEY_MAX);
	rec->flags = 0;
	rec->key_len = sg_config.key_size;
	sk = bpf_map_lookup_elem(&target, key);
	if (!sk)
		return 1;
	rec->flags = REC_HAS_SOCKET | REC_TUPLE_ONLY;
	copy_tuple(rec, sk);
	if (btf) {
		struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);

		if (tp) {
			struct sock *s = (struct sock *)tp;
			unsigned long sk_flags = s->__sk_common.skc_flags;
			int dead = bpf_core_enum_value(enum sock_flags, SOCK_DEAD);

			rec->flags = REC_HAS_SOCKET | ((sk_flags >> dead) & 1 ? REC_DEAD : 0);
			rec->cookie = s->__sk_common.skc_cookie.counter;
			rec->netns_ino = s->__sk_common.skc_net.net->ns.inum;
			/* sock_state.h's recv_code(): the address read directly (no probe_read in tc) */
			rec->recv = recv_code((__u64)s->__sk_common.skc_prot->recvmsg);
		}
	}
	bpf_sk_release(sk);
	if (sg_config.judge && sg_healthy(rec, RECV_TCP) && count_healthy(rec->netns_ino)) {
		rec->flags |= REC_HEALTHY;
		return 0;
	}
	return 1;
}

/*
 * One record each, as global functions: the verifier checks a global function
 * once, on its own (btf_check_func_arg_match, since 5.6), instead of once per
 * record along every path of the batch.  They return 1 for a record userspace
 * must read, 0 for one counted healthy, -1 past the packet's end.
 */
__noinline int lookup_one_btf(struct __sk_buff *skb, __u32 i)
{
	return lookup(skb, i, true);
}

__noinline int lookup_one_tuple(struct __sk_buff *skb, __u32 i)
{
	return lookup(skb, i, false);
}

SEC("tc")
int lookup_btf(struct __sk_buff *skb)
{
	int i, r, unread = 0;

#pragma unroll
	for (i = 0; i < BATCH; i++) {
		r = lookup_one_btf(skb, i);
		if (r < 0)
			break;
		unread += r;
	}
	return unread;
}

SEC("tc")
int lookup_tuple(struct __sk_buff *skb)
{
	int i, r, unread = 0;

#pragma unroll
	for (i = 0; i < BATCH; i++) {
		r = lookup_one_tuple(skb, i);
		if (r < 0)
			break;
		unread += r;
	}
	return unread;
}
