// SPDX-License-Identifier: GPL-2.0
/*
 * task_owners: which process holds each of a few sockets, found in the kernel.
 *
 * A finding names the process of its socket.  From /proc that costs one
 * readlink per open file of every process (~3 us each: half a second on a node
 * with 100,000 sockets); iter/task_file walks the same fd tables in the kernel
 * and this program writes a record only for a file whose inode userspace put in
 * `wanted`.  bpf_iter_task_file visits each process once (task_seq_get_next
 * skips threads sharing their leader's files), in ascending tid order, as /proc
 * lists them.
 *
 * The record layout is mirrored by sockguard/kernel/task_owners.py (RECORD).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* Inodes per walk; userspace walks again for more. */
#define WANTED_MAX 4096

char _license[] SEC("license") = "GPL";

struct owner_record {
	__u64 ino;
	__u32 tgid; /* in the initial pid namespace: userspace reads /proc only there */
	__u32 _pad;
};

/* Keeps struct owner_record in the object's BTF, where the tests compare it with
 * its Python copy (a type used only by a local variable is not emitted). */
const volatile struct owner_record owner_record_btf = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WANTED_MAX);
	__type(key, __u64);
	__type(value, __u8);
} wanted SEC(".maps");

SEC("iter/task_file")
int task_owners(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct owner_record rec = {};
	struct inode *inode;

	if (!task || !file)
		return 0;
	inode = BPF_CORE_READ(file, f_inode);
	if (!inode || (BPF_CORE_READ(inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	rec.ino = BPF_CORE_READ(inode, i_ino);
	if (!bpf_map_lookup_elem(&wanted, &rec.ino))
		return 0;
	rec.tgid = BPF_CORE_READ(task, tgid);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
