/* The get_next_key walk of a BPF map in one native loop (loaded with ctypes).
 *
 * A sockhash can only be walked from userspace one BPF_MAP_GET_NEXT_KEY syscall per
 * key (no batch operations for sockmap/sockhash, and the map iterator is refused on
 * some kernels).  The syscall itself costs ~0.65 us per key of a full Cilium map; a
 * ctypes call around it costs as much again, so this loop is the whole reason for
 * this file: 65,535 keys take ~43 ms here against ~107 ms from a Python loop.
 *
 * Built at package build time (setup.py) with clang; no Python or libbpf headers.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/bpf.h>

/* The attr up to next_key, as libbpf's bpf_map_get_next_key passes it. */
#define ATTR_SIZE (offsetof(union bpf_attr, next_key) + sizeof(__u64))

/* Walk on from ``start`` (NULL: from the first key), writing each next key into
 * ``out`` (``limit`` slots of ``key_size`` bytes) and the number written to
 * ``*walked``.  Returns 0 when ``limit`` keys were written, 1 at the end of the map
 * (ENOENT), or -errno of the call that failed.  Repeats are the caller's to find:
 * when the key walked from is deleted, sock_hash_get_next_key restarts at the first
 * bucket. */
int sg_walk_keys(int fd, const void *start, unsigned int key_size, void *out,
		 unsigned int limit, unsigned int *walked)
{
	union bpf_attr attr;
	char *next = out;
	unsigned int n = 0;
	int ret = 0;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = fd;
	attr.key = (uint64_t)(uintptr_t)start;
	while (n < limit) {
		attr.next_key = (uint64_t)(uintptr_t)next;
		if (syscall(__NR_bpf, BPF_MAP_GET_NEXT_KEY, &attr, ATTR_SIZE) != 0) {
			ret = errno == ENOENT ? 1 : -errno;
			break;
		}
		attr.key = attr.next_key;
		next += key_size;
		n++;
	}
	*walked = n;
	return ret;
}
