// SPDX-License-Identifier: GPL-2.0
/*
 * probe_caps: one do-nothing program per program type sockguard's tracer
 * uses.  sockguard/capabilities.py loads each one alone (the others with
 * autoload off) and, where harmless, attaches and detaches it: that is the
 * only honest answer to "does this kernel allow X" — config files, kernel
 * versions and BTF can all say yes while the verifier, lockdown or a missing
 * PMU says no.
 *
 * The attach points are the tracer's own (sk_psock_drop, sock_recv_length,
 * tcp_destroy_sock, inet_sock_set_state): if the probe attaches, so will the
 * tracer, and the do-nothing programs are detached again within microseconds.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char _license[] SEC("license") = "GPL";

SEC("kprobe/sk_psock_drop")
int BPF_KPROBE(probe_kprobe)
{
	return 0;
}

SEC("fentry/sk_psock_drop")
int BPF_PROG(probe_fentry)
{
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(probe_tp_btf)
{
	return 0;
}

/*
 * tp_btf on the lifecycle's tracepoint, with the helpers its programs call on
 * the typed socket: bpf_get_socket_cookie (tracing programs since 5.12) and
 * bpf_get_current_task_btf (5.11).  sock_recv_length (6.3) is not what
 * decides the lifecycle's program type: 5.12-6.2 have these but not it.
 */
SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(probe_tp_btf_sock, struct sock *sk)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return (bpf_get_socket_cookie(sk) ^ task->tgid) == 1;
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(probe_raw_tp)
{
	return 0;
}

SEC("iter/tcp")
int probe_iter_tcp(struct bpf_iter__tcp *ctx)
{
	return 0;
}
