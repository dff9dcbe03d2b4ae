// SPDX-License-Identifier: GPL-2.0
/*
 * trace_lifecycle: TCP sockets becoming established, closing and dying.
 *
 * A sockhash entry is removed when its socket closes (sock_map_close).  On
 * the kernels of the incident that removal sometimes did not happen; the daemon
 * therefore checks, right after a socket dies, whether the key of its tuple
 * is still in a map and then runs an audit at once instead of waiting up to
 * audit.interval seconds.  For deaths the daemon uses only the destroy
 * program: tcp_destroy_sock fires once per socket, after sock_map_close has
 * removed the entry, where inet_sock_set_state's CLOSE can come before the
 * owner closes the socket (a reset), while the entry is still rightly there.
 * It attaches inet_sock_set_state for the ESTABLISHED transition only
 * (`established_only` below): the collision of a new connection with a
 * stale key, seen at connect, before any payload.
 *
 * Tracepoints sock:inet_sock_set_state and tcp:tcp_destroy_sock, attached as
 * tp_btf (typed struct sock, bpf_get_socket_cookie) or, before kernel 5.5,
 * as raw_tp.  Both attach by name through bpf(2), so neither needs tracefs
 * (which is not mounted at boot on some nodes); a classic "tracepoint/"
 * program would need /sys/kernel/tracing/events/.../id to attach.
 *
 * Only TCP sockets are reported, and only transitions that matter for
 * sockhash entries: into ESTABLISHED (the sockops insert point) and into
 * CLOSE from a synchronized state.  `states_all` (trace --all-states)
 * reports every transition.
 *
 * `filter_watched` (the daemon): only sockets whose filter key (any map
 * layout: see sockguard_trace.h) is in the `watched` set are reported; a CLOSE or destroy of any other
 * socket is parked in `pending` (sockguard_trace.h) in case its key shows up
 * in the map at the next refresh, i.e. was left behind.
 *
 * `established_only` (the daemon): inet_sock_set_state reports only the
 * transition into ESTABLISHED, tested before anything else, so the ~3 other
 * transitions of each connection cost a compare.  With the filter, only a
 * socket whose key is already watched is sent: a key already in the map
 * when its connection becomes established is a stale entry that the
 * connection's own sockops insert will collide with (EEXIST).  Userspace
 * then checks which socket the entry points to (sockguard/collision.py).
 * An ESTABLISHED of an unwatched key is never parked: the key that appears
 * afterwards is the connection's own insert.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#define SG_WATCHED
#include "sockguard_trace.h"

char _license[] SEC("license") = "GPL";

#define SG_TCP_ESTABLISHED 1
#define SG_TCP_SYN_SENT 2
#define SG_TCP_SYN_RECV 3
#define SG_TCP_CLOSE 7
#define SG_TCP_LISTEN 10

/* Set by userspace before load (one struct: its .rodata layout is fixed). */
const volatile struct {
	__u8 states_all;      /* every transition (sockguard trace --all-states) */
	__u8 filter_watched;  /* only sockets whose key is in `watched`, others parked */
	__u8 established_only; /* inet_sock_set_state: only into ESTABLISHED (daemon) */
	__u8 _pad[5];
} cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline int wanted(int oldstate, int newstate)
{
	if (cfg.established_only)
		return newstate == SG_TCP_ESTABLISHED;
	if (cfg.states_all)
		return 1;
	if (newstate == SG_TCP_ESTABLISHED)
		return 1;
	if (newstate != SG_TCP_CLOSE)
		return 0;
	/* a failed connect or a listener closing never had a sockhash entry */
	return oldstate != SG_TCP_SYN_SENT && oldstate != SG_TCP_SYN_RECV &&
	       oldstate != SG_TCP_LISTEN && oldstate != SG_TCP_CLOSE;
}

/*
 * `typed`: `sk` is a BTF pointer (tp_btf), read directly (SG_READ), and
 * bpf_get_socket_cookie (assigning a cookie when it has none yet) is called
 * only for an event that is sent.
 */
static __always_inline int emit(const struct sock *sk, __u32 type, int oldstate, int newstate,
				__u32 source, const bool typed)
{
	struct sg_event *ev;
	__u64 cookie;

	if (!sk || !sg_is_tcp(sk, typed))
		return 0;
	if (cfg.filter_watched &&
	    !sg_filter(sk, type == SG_EV_DESTROY || newstate == SG_TCP_CLOSE, type, oldstate,
		       newstate, 0, 0, source, typed))
		return 0;
	cookie = typed ? bpf_get_socket_cookie((void *)sk) : 0;
	ev = sg_reserve(&events, sk, type, cookie, source, typed);
	if (!ev)
		return 0;
	if (type == SG_EV_STATE) {
		ev->state_old = oldstate;
		ev->state_new = newstate;
	}
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(state_tp_btf, const struct sock *sk, const int oldstate, const int newstate)
{
	if (!wanted(oldstate, newstate))
		return 0;
	return emit(sk, SG_EV_STATE, oldstate, newstate, SG_SRC_TP_BTF, true);
}

/* Listeners are destroyed too; they never had an entry (no remote port). */
static __always_inline int connected(const struct sock *sk, const bool typed)
{
	return sk && SG_READ(typed, sk, __sk_common.skc_dport) != 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(destroy_tp_btf, struct sock *sk)
{
	if (!connected(sk, true))
		return 0;
	return emit(sk, SG_EV_DESTROY, 0, 0, SG_SRC_TP_BTF, true);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(state_raw_tp, const struct sock *sk, const int oldstate, const int newstate)
{
	if (!wanted(oldstate, newstate))
		return 0;
	return emit(sk, SG_EV_STATE, oldstate, newstate, SG_SRC_RAW_TP, false);
}

SEC("raw_tp/tcp_destroy_sock")
int BPF_PROG(destroy_raw_tp, struct sock *sk)
{
	if (!connected(sk, false))
		return 0;
	return emit(sk, SG_EV_DESTROY, 0, 0, SG_SRC_RAW_TP, false);
}
