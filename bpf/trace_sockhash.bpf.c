// SPDX-License-Identifier: GPL-2.0
/*
 * trace_sockhash: sockhash inserts and their result, and psock drops with
 * their caller.
 *
 * The incident's collision, as the kernel lives it: the sockops program calls
 * bpf_sock_hash_update(..., BPF_NOEXIST) for the server side of a new
 * connection, sock_hash_update_common finds the stale key and returns
 * -EEXIST, and on its way out drops the psock it had just attached
 * (sk_psock_put -> sk_psock_drop, called from sock_hash_update_common).  A
 * normal close drops the psock from sock_map_close instead.
 *
 * Updates: sock_hash_update_common is the one function every sockhash insert
 * goes through (the bpf_sock_hash_update helper, the userspace update via
 * sock_map_update_elem_sys, bpf_sock_map_update's hash twin).  Its arguments
 * are needed with its result, so the program pairs
 *   kprobe + kretprobe (arguments parked per task in `inflight`), or
 *   fexit (arguments and result in one call, where trampolines work).
 * `inflight` is keyed by pid_tgid: an update in softirq context runs on the
 * interrupted task's key, and a softirq update nested inside a process-
 * context update of the same task (possible only outside the bucket lock,
 * which disables BHs) would overwrite the outer one's arguments; the outer
 * kretprobe then finds no entry and reports nothing.  Rare and harmless.
 *
 * Drops: the caller of sk_psock_drop is classified from a short kernel
 * stack (bpf_get_stack, 8 frames) that userspace symbolizes with
 * /proc/kallsyms: the first frame that is not sk_psock_drop/sk_psock_put
 * names the caller (sock_map_close: normal close; sock_hash_update_common /
 * sock_map_update_common / sock_map_link: a failed update).  A per-CPU "in
 * update" flag set by the update kprobe would be cheaper but wrong after a
 * preemption or migration between the two probes, and blind to callers
 * nobody thought of; the stack names every caller.  Drops are rare (one per
 * socket leaving a map), so the stack walk costs nothing that matters.
 *
 * `failures_only` (the daemon's setting) reports only updates that failed;
 * `sockguard trace` reports every update.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "sockguard_trace.h"

char _license[] SEC("license") = "GPL";

/* Set by userspace before load (one struct: its .rodata layout is fixed). */
const volatile struct {
	__u8 failures_only;  /* report only failed updates (the daemon) */
	__u8 _pad[7];
} cfg = {};

struct update_args {
	struct bpf_map *map;
	void *key;
	struct sock *sk;
	__u64 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct update_args);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline int report_update(struct bpf_map *map, void *key, struct sock *sk,
					 __u64 flags, int ret, __u32 source)
{
	struct sg_event *ev;
	__u32 len;

	if (cfg.failures_only && ret == 0)
		return 0;
	ev = sg_reserve(&events, sk, SG_EV_UPDATE, 0, source, false);
	if (!ev)
		return 0;
	ev->ret = ret;
	ev->aux = flags;
	if (map) {
		ev->map_id = BPF_CORE_READ(map, id);
		BPF_CORE_READ_STR_INTO(&ev->map_name, map, name);
		len = BPF_CORE_READ(map, key_size);
		if (len > SG_KEY_MAX)
			len = SG_KEY_MAX;
		ev->key_size = len;
		if (key && len)
			bpf_probe_read_kernel(ev->key, len, key);
	}
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

static __always_inline int report_drop(void *ctx, struct sock *sk, __u32 source)
{
	struct sg_event *ev;

	ev = sg_reserve(&events, sk, SG_EV_PSOCK_DROP, 0, source, false);
	if (!ev)
		return 0;
	bpf_get_stack(ctx, ev->stack, sizeof(ev->stack), 0);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/* -- kprobe variant (kernels with CONFIG_KPROBES) -------------------------- */

SEC("kprobe/sock_hash_update_common")
int BPF_KPROBE(update_kprobe, struct bpf_map *map, void *key, struct sock *sk, __u64 flags)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct update_args args = {.map = map, .key = key, .sk = sk, .flags = flags};

	bpf_map_update_elem(&inflight, &id, &args, BPF_ANY);
	return 0;
}

SEC("kretprobe/sock_hash_update_common")
int BPF_KRETPROBE(update_kretprobe, int ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct update_args *args = bpf_map_lookup_elem(&inflight, &id);

	if (!args)
		return 0;
	/* The key still points into the caller's frame or the sockops context,
	 * both alive until the caller returns, i.e. after this kretprobe. */
	report_update(args->map, args->key, args->sk, args->flags, ret, SG_SRC_KPROBE);
	bpf_map_delete_elem(&inflight, &id);
	return 0;
}

SEC("kprobe/sk_psock_drop")
int BPF_KPROBE(drop_kprobe, struct sock *sk)
{
	return report_drop(ctx, sk, SG_SRC_KPROBE);
}

/* -- fentry/fexit variant (BPF trampolines) -------------------------------- */

SEC("fexit/sock_hash_update_common")
int BPF_PROG(update_fexit, struct bpf_map *map, void *key, struct sock *sk, __u64 flags, int ret)
{
	return report_update(map, key, sk, flags, ret, SG_SRC_FENTRY);
}

SEC("fentry/sk_psock_drop")
int BPF_PROG(drop_fentry, struct sock *sk)
{
	return report_drop(ctx, sk, SG_SRC_FENTRY);
}
