// SPDX-License-Identifier: GPL-2.0
/*
 * cilium_lab.bpf.c - a Cilium-compatible sockops world for sockguard's tests.
 *
 * This object reproduces the *observable* behaviour of Cilium v1.11's
 * `--sockops-enable` datapath (bpf/sockops/bpf_sockops.c and bpf_redir.c),
 * without its policy, service and endpoint lookups:
 *
 *   - a SOCKHASH named exactly `cilium_sock_ops` with Cilium's packed 44-byte
 *     `struct sock_key` and a 4-byte (`int`) value;
 *   - a sockops program that, when a TCP socket becomes ESTABLISHED (active
 *     or passive side), stores the socket under the key written from its
 *     PEER's point of view, with BPF_NOEXIST;
 *   - an sk_msg program that builds the key from the SENDER's point of view
 *     (which is the peer socket's key), redirects the payload into that
 *     socket's ingress queue and always returns SK_PASS, so a miss falls back
 *     to the normal TCP stack.
 *
 * Cilium only inserts a socket when the destination is a local endpoint; in
 * the lab "local" means "the socket was created inside the lab cgroup", which
 * the cgroup attachment already decides, so every established socket of that
 * cgroup is inserted.  That is what makes stale/colliding keys reproducible.
 *
 * Divergence, on purpose: Cilium v1.11 keys only IPv4 (an AF_INET6 socket is
 * handed to the IPv4 path when `remote_ip4` is non-zero, meant for
 * IPv4-mapped peers).  The lab gives IPv4-mapped sockets an IPv4 key too, and
 * additionally keys native IPv6 sockets with family 2 and full 16-byte
 * addresses, because sockguard must decode both families.
 *
 * lab_stats (u64 array) counts what happened, so tests can assert on it:
 *   0 inserts ok, 1 inserts failed with -EEXIST, 2 other insert failures,
 *   3 redirects attempted by sk_msg, 4 sockops callbacks seen.
 */

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define EEXIST 17

/* Cilium's ENDPOINT_KEY_IPV4 / ENDPOINT_KEY_IPV6. */
#define LAB_KEY_IPV4 1
#define LAB_KEY_IPV6 2

/*
 * A plain 32-bit context load.  Cilium uses READ_ONCE on remote_port because
 * clang may otherwise narrow "x >> 16" into a 16-bit load of the upper half,
 * which older verifiers reject for this field.
 */
#define LAB_READ_ONCE(x) (*(volatile typeof(x) *)&(x))

enum lab_stat {
	STAT_INSERT_OK = 0,
	STAT_INSERT_EEXIST = 1,
	STAT_INSERT_OTHER = 2,
	STAT_REDIRECT = 3,
	STAT_SOCKOPS_CB = 4,
	STAT_MAX = 8,
};

/*
 * Cilium's struct sock_key (bpf/sockops/bpf_sockops.h), same offsets:
 *   0 sip (16), 16 dip (16), 32 family (1), 33 pad (3), 36 sport (4), 40 dport (4).
 * Ports are u32 holding a big-endian u16 in their low-addressed two bytes.
 * aligned(4) only lets clang use word stores; the size stays 44.
 */
struct sock_key {
	__u32 sip[4];
	__u32 dip[4];
	__u8 family;
	__u8 pad7;
	__u16 pad8;
	__u32 sport;
	__u32 dport;
} __attribute__((packed, aligned(4)));

_Static_assert(sizeof(struct sock_key) == 44, "Cilium's sock_key is 44 bytes");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65535);
	__type(key, struct sock_key);
	__type(value, int);
} cilium_sock_ops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} lab_stats SEC(".maps");

/*
 * An AF_INET6 socket talks IPv4 when its peer address is IPv4-mapped
 * (::ffff:a.b.c.d).  Cilium v1.11 tests `remote_ip4 != 0` instead, but that
 * field is never zero for a connected IPv6 socket: tcp_v6_connect and
 * tcp_v6_syn_recv_sock set inet_daddr to LOOPBACK4_IPV6 (127.0.0.6) for
 * native IPv6 peers.  So the lab looks at the address itself.
 */
static __always_inline bool v4_mapped(__u32 a0, __u32 a1, __u32 a2)
{
	return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff);
}

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *val = bpf_map_lookup_elem(&lab_stats, &idx);

	if (val)
		__sync_fetch_and_add(val, 1);
}

/*
 * The key from the socket's own point of view, as Cilium's sk_extract4_key
 * does: local_port is host order (ntohl + shift leaves the big-endian u16 in
 * the low bytes), remote_port is already network order in the upper half.
 */
static __always_inline void sk_extract_key(struct bpf_sock_ops *ops, struct sock_key *key,
					   bool v6)
{
	if (v6) {
		key->sip[0] = ops->local_ip6[0];
		key->sip[1] = ops->local_ip6[1];
		key->sip[2] = ops->local_ip6[2];
		key->sip[3] = ops->local_ip6[3];
		key->dip[0] = ops->remote_ip6[0];
		key->dip[1] = ops->remote_ip6[1];
		key->dip[2] = ops->remote_ip6[2];
		key->dip[3] = ops->remote_ip6[3];
		key->family = LAB_KEY_IPV6;
	} else {
		key->sip[0] = ops->local_ip4;
		key->dip[0] = ops->remote_ip4;
		key->family = LAB_KEY_IPV4;
	}
	key->sport = bpf_ntohl(ops->local_port) >> 16;
	key->dport = LAB_READ_ONCE(ops->remote_port) >> 16;
}

static __always_inline void lab_sock_ops_insert(struct bpf_sock_ops *skops, bool v6)
{
	struct sock_key key = {};
	__u32 tmp;
	long err;
	int i;

	sk_extract_key(skops, &key, v6);

	/* Cilium's final swap: store the key the PEER's sk_msg will build. */
#pragma unroll
	for (i = 0; i < 4; i++) {
		tmp = key.sip[i];
		key.sip[i] = key.dip[i];
		key.dip[i] = tmp;
	}
	tmp = key.sport;
	key.sport = key.dport;
	key.dport = tmp;

	err = bpf_sock_hash_update(skops, &cilium_sock_ops, &key, BPF_NOEXIST);
	if (err == 0)
		stat_inc(STAT_INSERT_OK);
	else if (err == -EEXIST)
		stat_inc(STAT_INSERT_EEXIST);
	else
		stat_inc(STAT_INSERT_OTHER);
}

SEC("sockops")
int lab_sockops(struct bpf_sock_ops *skops)
{
	__u32 family = skops->family;
	__u32 op = skops->op;

	stat_inc(STAT_SOCKOPS_CB);

	switch (op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (family == AF_INET)
			lab_sock_ops_insert(skops, false);
		else if (family == AF_INET6)
			/* Like Cilium: an IPv4-mapped v6 socket gets an IPv4 key. */
			lab_sock_ops_insert(skops, !v4_mapped(skops->remote_ip6[0],
							      skops->remote_ip6[1],
							      skops->remote_ip6[2]));
		break;
	default:
		break;
	}
	return 0;
}

SEC("sk_msg")
int lab_sk_msg(struct sk_msg_md *msg)
{
	struct sock_key key = {};

	/* Sender's point of view, no swap (Cilium's sk_msg_extract4_key). */
	if (msg->family == AF_INET6 &&
	    !v4_mapped(msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2])) {
		key.sip[0] = msg->local_ip6[0];
		key.sip[1] = msg->local_ip6[1];
		key.sip[2] = msg->local_ip6[2];
		key.sip[3] = msg->local_ip6[3];
		key.dip[0] = msg->remote_ip6[0];
		key.dip[1] = msg->remote_ip6[1];
		key.dip[2] = msg->remote_ip6[2];
		key.dip[3] = msg->remote_ip6[3];
		key.family = LAB_KEY_IPV6;
	} else {
		key.sip[0] = msg->local_ip4;
		key.dip[0] = msg->remote_ip4;
		key.family = LAB_KEY_IPV4;
	}
	key.sport = bpf_ntohl(msg->local_port) >> 16;
	key.dport = LAB_READ_ONCE(msg->remote_port) >> 16;

	stat_inc(STAT_REDIRECT);
	/* The verdict is ignored, as in Cilium: SK_PASS either way. */
	bpf_msg_redirect_hash(msg, &cilium_sock_ops, &key, BPF_F_INGRESS);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
