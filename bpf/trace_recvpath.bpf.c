// SPDX-License-Identifier: GPL-2.0
/*
 * trace_recvpath: which receive function each TCP socket uses.
 *
 * A socket inside a sockhash/sockmap has its sk_prot replaced by tcp_bpf's
 * (recvmsg = tcp_bpf_recvmsg, or tcp_bpf_recvmsg_parser with an sk_skb
 * verdict); any other TCP socket receives with tcp_recvmsg.  The incident's
 * shadowed server socket failed its insert (EEXIST), so it kept tcp_recvmsg
 * while its peer redirected every payload into the stale entry's socket:
 * "receives via tcp_recvmsg although its key is in the map" is the symptom.
 *
 * The program only reports the function pointer sk->sk_prot->recvmsg;
 * userspace names it with /proc/kallsyms.  That keeps the object free of
 * __ksym externs, which would fail to load on kernels where tcp_bpf_recvmsg
 * is missing (CONFIG_BPF_STREAM_PARSER=n) or renamed.
 *
 * Two variants, userspace loads one:
 *   tp_btf/sock_recv_length  (kernel >= 6.3: fires after every recvmsg, with
 *                             its result, typed struct sock, no tracefs)
 *   kprobe/inet_recvmsg + kprobe/inet6_recvmsg  (older kernels, needs kprobes)
 *
 * Volume: a recvmsg is a hot path, so by default each (socket, recvmsg
 * function) pair is reported once ("seen" slots); `only_fn` restricts the
 * events to one function (the daemon passes tcp_recvmsg's address), and
 * `filter_watched` (the daemon) to sockets whose filter key is in the
 * `watched` set (sockguard_trace.h): a plain socket outside every map
 * then costs one hash lookup once, and no ring buffer record.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#define SG_WATCHED
#include "sockguard_trace.h"

char _license[] SEC("license") = "GPL";

/* Set by userspace before load (one struct: its .rodata layout is fixed). */
const volatile struct {
	__u64 only_fn;  /* non-zero: report only this recvmsg function */
	__u8 dedup;     /* report each (socket, function) pair once */
	__u8 filter_watched;  /* only sockets whose key is in `watched`, others parked */
	__u8 _pad[6];
} cfg = {.dedup = 1};

/*
 * Dedup: a direct-mapped array by socket address (a slot remembers the last
 * socket hashing there and its recvmsg function).  Not an LRU hash: under
 * connection churn an LRU is always full and pays an eviction per new socket
 * (microseconds each); not socket-local storage: an allocation per socket.
 * Two sockets sharing a slot only cost a repeated report.
 */
#define SEEN_BITS 16

struct seen_slot {
	__u64 sk;      /* the cookie (tp_btf) or the socket's address >> 6 (kprobe) */
	__u64 cookie;
	__u64 fn;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << SEEN_BITS);
	__type(key, __u32);
	__type(value, struct seen_slot);
} seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/*
 * typed (tp_btf): `sk` is a BTF pointer, read directly, with a unique cookie
 * (bpf_get_socket_cookie assigns one when the socket has none yet);
 * untyped (kprobe): `sk` is a plain number, read through probe reads.
 */
static __always_inline int report(struct sock *sk, int ret, __u32 source, const bool typed)
{
	struct seen_slot *slot;
	struct sg_event *ev;
	__u64 fn, id, cookie;
	__u32 idx;

	if (!sk || !sg_is_tcp(sk, typed))
		return 0;
	fn = (__u64)(typed ? sk->__sk_common.skc_prot->recvmsg
			   : BPF_CORE_READ(sk, __sk_common.skc_prot, recvmsg));
	if (cfg.only_fn && fn != cfg.only_fn)
		return 0;
	/* Before the dedup slot: an unwatched socket's receives are all parked, in
	 * the same slot (hot in cache on a long connection), so the last one is
	 * there when its key shows up; the dedup slot is a cache miss per new
	 * socket, and only watched sockets need it. */
	if (cfg.filter_watched &&
	    !sg_filter(sk, 1, SG_EV_RECV, 0, 0, fn, ret, source, typed))
		return 0;
	cookie = typed ? bpf_get_socket_cookie(sk) : 0;
	if (cfg.dedup) {
		id = typed ? cookie : (__u64)sk >> 6;
		idx = (__u32)((id * 0x9E3779B97F4A7C15ull) >> (64 - SEEN_BITS));
		slot = bpf_map_lookup_elem(&seen, &idx);
		if (slot) {
			if (slot->sk == id && slot->cookie == cookie && slot->fn == fn)
				return 0;
			slot->sk = id;
			slot->cookie = cookie;
			slot->fn = fn;
		}
	}
	ev = sg_reserve(&events, sk, SG_EV_RECV, cookie, source, typed);
	if (!ev)
		return 0;
	ev->aux = fn;
	ev->ret = ret;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(recv_tp_btf, struct sock *sk, int ret, int flags)
{
	return report(sk, ret, SG_SRC_TP_BTF, true);
}

SEC("kprobe/inet_recvmsg")
int BPF_KPROBE(recv_kprobe_inet, struct socket *sock)
{
	struct sock *sk = BPF_CORE_READ(sock, sk);

	return report(sk, 0, SG_SRC_KPROBE, false);
}

SEC("kprobe/inet6_recvmsg")
int BPF_KPROBE(recv_kprobe_inet6, struct socket *sock)
{
	struct sock *sk = BPF_CORE_READ(sock, sk);

	return report(sk, 0, SG_SRC_KPROBE, false);
}
