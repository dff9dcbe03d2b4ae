// SPDX-License-Identifier: GPL-2.0
/*
 * sockmap_iter: the kernel's view of what each sockhash/sockmap entry points to.
 *
 * Userspace can list a sockhash's keys but, when value_size is 4 (Cilium's
 * cilium_sock_ops), cannot look up which socket a key holds.  This iterator
 * walks the map in the kernel and writes one fixed-size record per entry:
 * the key bytes and the socket's cookie, family, state, netns and tuple,
 * whether its process has closed it and which receive path it has
 * (sock_state.h).
 *
 * The record layout (entry_record.h) is mirrored by sockguard/sockmap_iter.py
 * (RECORD).  With sg_config.judge, healthy entries are only counted.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "sock_state.h"
#include "entry_record.h"

char _license[] SEC("license") = "GPL";

/*
 * Healthy entries counted in this walk (sg_config.judge); written into the
 * walk's last record (REC_SUMMARY) and reset there, and at a walk's first entry.
 */
__u64 healthy_count = 0;

/*
 * Healthy entries per network namespace of their socket (sg_config.judge):
 * userspace compares these namespaces with the ones it can reach, so an entry
 * whose socket lives where no enumeration reaches is still accounted for.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);   /* netns inode */
	__type(value, __u64); /* healthy entries */
} healthy_netns SEC(".maps");

/* One record lives here, not on the 512-byte stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct record);
} scratch SEC(".maps");

/*
 * bpf_get_socket_cookie() is callable from iterator programs only since 5.12
 * (tracing_prog_func_proto gained bpf_get_socket_ptr_cookie_proto); on older
 * kernels such as 5.10, the incident's, the compat program reads the cookie
 * field instead.  skc_cookie stays 0 until something asks for the cookie
 * (sock_gen_cookie): sock_diag does for every socket it reports, so userspace
 * scans the sockets first, and 0 then means "no socket sock_diag lists".
 */
static __always_inline int dump(struct bpf_iter__sockmap *ctx, bool cookie_helper)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock *sk = ctx->sk;
	void *key = ctx->key;
	struct record *rec;
	__u32 zero = 0;
	__u32 len = sg_config.key_size;

	rec = bpf_map_lookup_elem(&scratch, &zero);
	if (!rec)
		return 0;
	__builtin_memset(rec, 0, sizeof(*rec));

	/* The final call of a walk (seq stop, net/core/sock_map.c) has no key. */
	if (!key) {
		if (sg_config.judge) {
			rec->flags = REC_SUMMARY;
			rec->cookie = healthy_count;
			bpf_seq_write(seq, rec, sizeof(*rec));
		}
		healthy_count = 0;
		return 0;
	}
	if (ctx->meta->seq_num == 0)
		healthy_count = 0;

	if (len > KEY_MAX)
		len = KEY_MAX;
	rec->key_len = len;
	/*
	 * ctx->key is a read-only buffer whose furthest direct access is checked
	 * against the map's key size when the iterator is attached
	 * (sock_map_iter_attach_target); reading it through a helper keeps the
	 * program attachable to maps of any key size.
	 */
	if (len)
		bpf_probe_read_kernel(rec->key, len, key);

	if (sk) {
		rec->flags = REC_HAS_SOCKET | (sock_dead(sk) ? REC_DEAD : 0);
		rec->recv = recv_path(sk);
		if (cookie_helper)
			rec->cookie = bpf_get_socket_cookie(sk);
		else
			rec->cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
		rec->family = BPF_CORE_READ(sk, __sk_common.skc_family);
		rec->state = BPF_CORE_READ(sk, __sk_common.skc_state);
		rec->netns_ino = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
		rec->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
		rec->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
		if (rec->family == AF_INET6) {
			BPF_CORE_READ_INTO(&rec->saddr, sk, __sk_common.skc_v6_rcv_saddr);
			BPF_CORE_READ_INTO(&rec->daddr, sk, __sk_common.skc_v6_daddr);
		} else {
			BPF_CORE_READ_INTO((__be32 *)rec->saddr, sk, __sk_common.skc_rcv_saddr);
			BPF_CORE_READ_INTO((__be32 *)rec->daddr, sk, __sk_common.skc_daddr);
		}
	}

	if (sg_config.judge && sg_healthy(rec, RECV_TCP)) {
		__u64 one = 1, *n = bpf_map_lookup_elem(&healthy_netns, &rec->netns_ino);

		if (n)
			__sync_fetch_and_add(n, 1);
		else
			bpf_map_update_elem(&healthy_netns, &rec->netns_ino, &one, BPF_NOEXIST);
		healthy_count++;
		return 0;
	}
	bpf_seq_write(seq, rec, sizeof(*rec));
	return 0;
}

SEC("iter/sockmap")
int dump_sockmap(struct bpf_iter__sockmap *ctx)
{
	return dump(ctx, true);
}

SEC("iter/sockmap")
int dump_sockmap_compat(struct bpf_iter__sockmap *ctx)
{
	return dump(ctx, false);
}
