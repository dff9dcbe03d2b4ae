// SPDX-License-Identifier: GPL-2.0
/*
 * trace_recvpath: which receive function each TCP socket uses.
 *
 * A socket inside a sockhash/sockmap has its sk_prot replaced by tcp_bpf's
 * (recvmsg = tcp_bpf_recvmsg, or tcp_bpf_recvmsg_parser with an sk_skb
 * verdict); any other TCP socket receives with tcp_recvmsg.  The seed's
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
 * function) pair is reported once (LRU "seen" map); `only_fn` restricts the
 * events to one function (the daemon passes tcp_recvmsg's address).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "sockguard_trace.h"

char _license[] SEC("license") = "GPL";

/* Set by userspace before load (one struct: its .rodata layout is fixed). */
const volatile struct {
	__u64 only_fn;  /* non-zero: report only this recvmsg function */
	__u8 dedup;     /* report each (socket, function) pair once */
	__u8 _pad[7];
} cfg = {.dedup = 1};

struct seen_key {
	__u64 sk;
	__u64 cookie;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct seen_key);
	__type(value, __u64);
} seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline int report(struct sock *sk, __u64 cookie, int ret, __u32 source)
{
	struct seen_key k = {};
	struct sg_event *ev;
	__u64 fn, *old;

	if (!sk || !sg_is_tcp(sk))
		return 0;
	fn = (__u64)BPF_CORE_READ(sk, __sk_common.skc_prot, recvmsg);
	if (cfg.only_fn && fn != cfg.only_fn)
		return 0;
	if (cfg.dedup) {
		k.sk = (__u64)sk;
		k.cookie = cookie;
		old = bpf_map_lookup_elem(&seen, &k);
		if (old && *old == fn)
			return 0;
		bpf_map_update_elem(&seen, &k, &fn, BPF_ANY);
	}
	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev)
		return 0;
	__builtin_memset(ev, 0, sizeof(*ev));
	sg_fill_sock(ev, sk, SG_EV_RECV);
	if (cookie)
		ev->cookie = cookie;
	ev->aux = fn;
	ev->ret = ret;
	ev->source = source;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(recv_tp_btf, struct sock *sk, int ret, int flags)
{
	/* bpf_get_socket_cookie assigns a cookie when the socket has none yet. */
	return report(sk, sk ? bpf_get_socket_cookie(sk) : 0, ret, SG_SRC_TP_BTF);
}

SEC("kprobe/inet_recvmsg")
int BPF_KPROBE(recv_kprobe_inet, struct socket *sock)
{
	struct sock *sk = BPF_CORE_READ(sock, sk);

	return report(sk, 0, 0, SG_SRC_KPROBE);
}

SEC("kprobe/inet6_recvmsg")
int BPF_KPROBE(recv_kprobe_inet6, struct socket *sock)
{
	struct sock *sk = BPF_CORE_READ(sock, sk);

	return report(sk, 0, 0, SG_SRC_KPROBE);
}
