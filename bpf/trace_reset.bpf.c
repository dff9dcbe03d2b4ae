// SPDX-License-Identifier: GPL-2.0
/*
 * trace_reset: a TCP socket closed by an error while its process still holds it.
 *
 * A connection that is reset by its peer (tcp_reset) or times out
 * (tcp_write_err) goes to CLOSE at once (tcp_done_with_error), but its
 * sockhash entry is removed only when the process closes the fd
 * (sock_map_close): until then the entry is stale, and a reconnect on the
 * same tuple collides with it.  Neither tcp_destroy_sock (that comes at the
 * close) nor, in the daemon, inet_sock_set_state (only attached while the
 * collision check listens) sees that moment.  sk_error_report does: it fires
 * the tracepoint sock:inet_sk_error_report right after tcp_done, and only
 * when the socket is not orphaned (!SOCK_DEAD: a process holds it), which
 * is exactly this case.  It is rare on a healthy node (errors only), so the
 * program costs nothing under connection churn.
 *
 * The daemon uses it to learn that an entry went bad the moment it does: the
 * collision check (sockguard/trace/collision.py, CollisionGate) listens
 * again.  It starts no audit: a server usually closes a reset socket within
 * milliseconds, and on a node whose clients reset their connections an audit
 * per reset would cost more than the check; the periodic audit's two looks
 * find one held open.
 *
 * Only a connected TCP socket in CLOSE is reported (an error on a socket
 * that stays established, an ICMP error with IP_RECVERR, changes nothing in
 * a map).  With `filter_watched` (the daemon) only sockets whose filter key
 * is watched are sent, others parked in `pending` (sockguard_trace.h) in case
 * their key shows up at the next refresh.
 *
 * Variants: tp_btf (typed struct sock) and raw_tp; the tracepoint exists
 * since kernel 5.12 (sk_error_report, commit e6a3e44 "net: sock: introduce
 * sk_error_report").  Where it does not, the detection is inactive and the
 * collision check always listens.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#define SG_WATCHED
#include "sockguard_trace.h"

char _license[] SEC("license") = "GPL";

#define SG_TCP_CLOSE 7

/* Set by userspace before load (one struct: its .rodata layout is fixed). */
const volatile struct {
	__u8 filter_watched;  /* only sockets whose key is in `watched`, others parked */
	__u8 _pad[7];
} cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

static __always_inline int report(const struct sock *sk, __u32 source, const bool typed)
{
	struct sg_event *ev;
	__u64 cookie;
	int err;

	if (!sk || !sg_is_tcp(sk, typed))
		return 0;
	if (SG_READ(typed, sk, __sk_common.skc_state) != SG_TCP_CLOSE ||
	    SG_READ(typed, sk, __sk_common.skc_dport) == 0)
		return 0;
	err = -(int)SG_READ(typed, sk, sk_err);
	if (cfg.filter_watched &&
	    !sg_filter(sk, 1, SG_EV_RESET, 0, SG_TCP_CLOSE, 0, err, source, typed))
		return 0;
	cookie = typed ? bpf_get_socket_cookie((void *)sk) : 0;
	ev = sg_reserve(&events, sk, SG_EV_RESET, cookie, source, typed);
	if (!ev)
		return 0;
	ev->ret = err;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

SEC("tp_btf/inet_sk_error_report")
int BPF_PROG(reset_tp_btf, const struct sock *sk)
{
	return report(sk, SG_SRC_TP_BTF, true);
}

SEC("raw_tp/inet_sk_error_report")
int BPF_PROG(reset_raw_tp, const struct sock *sk)
{
	return report(sk, SG_SRC_RAW_TP, false);
}
