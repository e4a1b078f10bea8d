/* Drives file and socket operations through io_uring with raw syscalls
 * (no liburing), so that tests can check what the sensors see of them.
 *
 *   uring connect ADDR PORT [THEN]
 *                               IORING_OP_CONNECT to an IPv4 address, then
 *                               (with THEN) a plain connect(2) to port THEN
 *   uring write PATH TEXT       IORING_OP_OPENAT (write, create, truncate),
 *                               IORING_OP_WRITE, IORING_OP_CLOSE
 *   uring write-fixed PATH TEXT the same through a registered (fixed) file
 *                               slot: no fd is ever installed
 *   uring write-linked PATH TEXT
 *                               IORING_OP_OPENAT (write, no truncation) linked
 *                               to an IORING_OP_WRITE on the fd it will get
 *                               (the lowest free one), both submitted at once
 *   uring rename OLD NEW        IORING_OP_RENAMEAT
 *   uring unlink PATH           IORING_OP_UNLINKAT
 *   uring link OLD NEW          IORING_OP_LINKAT
 *   uring symlink TARGET NAME   IORING_OP_SYMLINKAT
 *
 * With URING_SQPOLL=1 in the environment the ring is polled by a kernel
 * thread (IORING_SETUP_SQPOLL): requests are submitted and completed with
 * no system call at all, unless the thread went idle and must be woken.
 *
 * Prints each request's result; exits 0 when every io_uring request
 * succeeded. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

struct ring {
	int fd;
	int sqpoll;
	unsigned *sq_tail, *sq_mask, *sq_array, *sq_flags;
	unsigned *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqes;
};

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void ring_init(struct ring *r)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof p);
	const char *sqpoll = getenv("URING_SQPOLL");
	r->sqpoll = sqpoll && !strcmp(sqpoll, "1");
	if (r->sqpoll) {
		p.flags = IORING_SETUP_SQPOLL;
		p.sq_thread_idle = 2000;
	}
	r->fd = (int)syscall(__NR_io_uring_setup, 8, &p);
	if (r->fd < 0)
		die("io_uring_setup");
	size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	if (p.features & IORING_FEAT_SINGLE_MMAP && cq_len > sq_len)
		sq_len = cq_len;
	char *sq = mmap(0, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
			IORING_OFF_SQ_RING);
	if (sq == MAP_FAILED)
		die("mmap sq");
	char *cq = sq;
	if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
		cq = mmap(0, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
			  IORING_OFF_CQ_RING);
		if (cq == MAP_FAILED)
			die("mmap cq");
	}
	r->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
	if (r->sqes == MAP_FAILED)
		die("mmap sqes");
	r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
	r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
	r->sq_array = (unsigned *)(sq + p.sq_off.array);
	r->sq_flags = (unsigned *)(sq + p.sq_off.flags);
	r->cq_head = (unsigned *)(cq + p.cq_off.head);
	r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
	r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
	r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

/* Submits `n` requests at once (linked or not, as their flags say) and
 * waits for all their completions; returns the last one's result. */
static int ring_run_n(struct ring *r, const struct io_uring_sqe *sqes, unsigned n, const char *name)
{
	unsigned tail = *r->sq_tail;
	for (unsigned k = 0; k < n; k++) {
		unsigned i = (tail + k) & *r->sq_mask;
		r->sqes[i] = sqes[k];
		r->sq_array[i] = i;
	}
	__atomic_store_n(r->sq_tail, tail + n, __ATOMIC_RELEASE);
	/* A polling kernel thread may have gone idle: woken, it takes them. */
	unsigned enter = IORING_ENTER_GETEVENTS | (r->sqpoll ? IORING_ENTER_SQ_WAKEUP : 0);
	if (syscall(__NR_io_uring_enter, r->fd, n, n, enter, NULL, 0) < 0)
		die("io_uring_enter");
	int res = 0;
	for (unsigned k = 0; k < n; k++) {
		unsigned head = *r->cq_head;
		while (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
			if (syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL,
				    0) < 0)
				die("io_uring_enter");
		res = r->cqes[head & *r->cq_mask].res;
		__atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
		printf("%s[%u] %d%s%s\n", name, k, res, res < 0 ? " " : "", res < 0 ? strerror(-res) : "");
	}
	return res;
}

/* Submits one request and waits for its completion; returns its result. */
static int ring_run(struct ring *r, const struct io_uring_sqe *sqe, const char *name)
{
	unsigned tail = *r->sq_tail;
	unsigned i = tail & *r->sq_mask;
	r->sqes[i] = *sqe;
	r->sq_array[i] = i;
	__atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
	unsigned head = *r->cq_head;
	if (r->sqpoll) {
		/* The kernel thread takes the request; we only watch the ring. */
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (__atomic_load_n(r->sq_flags, __ATOMIC_RELAXED) & IORING_SQ_NEED_WAKEUP &&
		    syscall(__NR_io_uring_enter, r->fd, 0, 0, IORING_ENTER_SQ_WAKEUP, NULL, 0) < 0)
			die("io_uring_enter");
		while (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
			usleep(1000);
	} else {
		if (syscall(__NR_io_uring_enter, r->fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
			die("io_uring_enter");
		while (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
			if (syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL,
				    0) < 0)
				die("io_uring_enter");
	}
	int res = r->cqes[head & *r->cq_mask].res;
	__atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
	printf("%s %d%s%s\n", name, res, res < 0 ? " " : "", res < 0 ? strerror(-res) : "");
	return res;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: uring connect ADDR PORT | write PATH TEXT | write-fixed PATH TEXT"
				" | rename OLD NEW | link OLD NEW | symlink TARGET NAME | unlink PATH\n");
		return 2;
	}
	struct ring r;
	ring_init(&r);
	struct io_uring_sqe sqe;
	memset(&sqe, 0, sizeof sqe);
	const char *op = argv[1];
	if (!strcmp(op, "connect") && (argc == 4 || argc == 5)) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s < 0)
			die("socket");
		struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
		if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1)
			die("inet_pton");
		sqe.opcode = IORING_OP_CONNECT;
		sqe.fd = s;
		sqe.addr = (uint64_t)(uintptr_t)&sa;
		sqe.off = sizeof sa;
		int res = ring_run(&r, &sqe, "connect");
		if (argc == 5) {
			int t = socket(AF_INET, SOCK_STREAM, 0);
			sa.sin_port = htons(atoi(argv[4]));
			int then = connect(t, (struct sockaddr *)&sa, sizeof sa);
			printf("then %d\n", then < 0 ? -errno : 0);
		}
		return res == 0 ? 0 : 1;
	}
	if (!strcmp(op, "write") && argc == 4) {
		sqe.opcode = IORING_OP_OPENAT;
		sqe.fd = AT_FDCWD;
		sqe.addr = (uint64_t)(uintptr_t)argv[2];
		sqe.len = 0644;
		sqe.open_flags = O_WRONLY | O_CREAT | O_TRUNC;
		int fd = ring_run(&r, &sqe, "openat");
		if (fd < 0)
			return 1;
		memset(&sqe, 0, sizeof sqe);
		sqe.opcode = IORING_OP_WRITE;
		sqe.fd = fd;
		sqe.addr = (uint64_t)(uintptr_t)argv[3];
		sqe.len = strlen(argv[3]);
		sqe.off = 0;
		if (ring_run(&r, &sqe, "write") != (int)strlen(argv[3]))
			return 1;
		memset(&sqe, 0, sizeof sqe);
		sqe.opcode = IORING_OP_CLOSE;
		sqe.fd = fd;
		return ring_run(&r, &sqe, "close") == 0 ? 0 : 1;
	}
	if (!strcmp(op, "write-linked") && argc == 4) {
		int next = dup(0);
		if (next < 0)
			die("dup");
		close(next);
		struct io_uring_sqe two[2];
		memset(two, 0, sizeof two);
		two[0].opcode = IORING_OP_OPENAT;
		two[0].fd = AT_FDCWD;
		two[0].addr = (uint64_t)(uintptr_t)argv[2];
		two[0].open_flags = O_WRONLY;
		two[0].flags = IOSQE_IO_LINK;
		two[1].opcode = IORING_OP_WRITE;
		two[1].fd = next;
		two[1].addr = (uint64_t)(uintptr_t)argv[3];
		two[1].len = strlen(argv[3]);
		return ring_run_n(&r, two, 2, "openat+write") == (int)strlen(argv[3]) ? 0 : 1;
	}
	if (!strcmp(op, "write-fixed") && argc == 4) {
		int none[1] = {-1};
		if (syscall(__NR_io_uring_register, r.fd, IORING_REGISTER_FILES, none, 1) < 0)
			die("io_uring_register");
		sqe.opcode = IORING_OP_OPENAT;
		sqe.fd = AT_FDCWD;
		sqe.addr = (uint64_t)(uintptr_t)argv[2];
		sqe.len = 0644;
		sqe.open_flags = O_WRONLY | O_CREAT | O_TRUNC;
		sqe.file_index = 1; /* slot 0 */
		if (ring_run(&r, &sqe, "openat-fixed") != 0)
			return 1;
		memset(&sqe, 0, sizeof sqe);
		sqe.opcode = IORING_OP_WRITE;
		sqe.fd = 0;
		sqe.flags = IOSQE_FIXED_FILE;
		sqe.addr = (uint64_t)(uintptr_t)argv[3];
		sqe.len = strlen(argv[3]);
		if (ring_run(&r, &sqe, "write-fixed") != (int)strlen(argv[3]))
			return 1;
		memset(&sqe, 0, sizeof sqe);
		sqe.opcode = IORING_OP_CLOSE;
		sqe.file_index = 1;
		return ring_run(&r, &sqe, "close-fixed") == 0 ? 0 : 1;
	}
	if ((!strcmp(op, "rename") || !strcmp(op, "link")) && argc == 4) {
		/* Both take (old dfd, old path, new dfd, new path). */
		int link = !strcmp(op, "link");
		sqe.opcode = link ? IORING_OP_LINKAT : IORING_OP_RENAMEAT;
		sqe.fd = AT_FDCWD;
		sqe.addr = (uint64_t)(uintptr_t)argv[2];
		sqe.len = (uint32_t)AT_FDCWD;
		sqe.addr2 = (uint64_t)(uintptr_t)argv[3];
		return ring_run(&r, &sqe, link ? "linkat" : "renameat") == 0 ? 0 : 1;
	}
	if (!strcmp(op, "symlink") && argc == 4) {
		sqe.opcode = IORING_OP_SYMLINKAT;
		sqe.fd = AT_FDCWD;
		sqe.addr = (uint64_t)(uintptr_t)argv[2];
		sqe.addr2 = (uint64_t)(uintptr_t)argv[3];
		return ring_run(&r, &sqe, "symlinkat") == 0 ? 0 : 1;
	}
	if (!strcmp(op, "unlink") && argc == 3) {
		sqe.opcode = IORING_OP_UNLINKAT;
		sqe.fd = AT_FDCWD;
		sqe.addr = (uint64_t)(uintptr_t)argv[2];
		return ring_run(&r, &sqe, "unlinkat") == 0 ? 0 : 1;
	}
	fprintf(stderr, "uring: unknown request %s\n", op);
	return 2;
}
