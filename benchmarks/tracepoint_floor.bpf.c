// SPDX-License-Identifier: GPL-2.0
/*
 * tracepoint_floor: programs that return at once, at the tracepoints the
 * daemon's tracer attaches (tracer_overhead.py --floor).  What a pair with
 * these attached loses is the tracepoints' own dispatch (the tracepoint's
 * call into bpf_trace_run*, the indirect call into the program, the
 * returns): the part of the tracer's cost that no program body can remove.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char _license[] SEC("license") = "GPL";

SEC("tp_btf/sock_recv_length")
int BPF_PROG(floor_recv, struct sock *sk, int ret, int flags)
{
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(floor_state, const struct sock *sk, const int oldstate, const int newstate)
{
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(floor_destroy, struct sock *sk)
{
	return 0;
}
