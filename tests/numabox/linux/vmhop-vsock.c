/*
 * vmhop-vsock: the NUMA box's vsock test tool, one static program for both
 * ends (build-guest-initrd.sh builds it into the Linux guest's initramfs;
 * tests/numabox/scenarios/linux.sh takes the same file out of that archive
 * for the box, which has no compiler).
 *
 *   vmhop-vsock serve  vsock:PORT | unix:PATH        [STATUS]
 *   vmhop-vsock client vsock:CID:PORT | unix:PATH:PORT [STATUS] [retry]
 *
 * Every connection carries the same byte stream each way: byte i is byte
 * i%4 (little end first) of the 32-bit word (i/4) * 2654435761, so a lost,
 * repeated or reordered byte shows at its offset. A client sends the
 * stream ROUND bytes at a time, reads them back (the server echoes) and
 * compares, then sleeps PAUSE_MS; a server checks what it receives against
 * the stream and echoes it. So one connection checks the data in both
 * directions: the client the echo, the server what the client sent.
 *
 * Addresses: vsock:PORT listens on AF_VSOCK (any cid); vsock:CID:PORT
 * connects there; unix:PATH listens on a Unix socket (a vmhop vsock
 * device's PATH_<port>, where the guest's connections to host port <port>
 * arrive); unix:PATH:PORT connects to PATH and asks for guest port PORT
 * with Firecracker's "CONNECT PORT\n", then reads the "OK ..." line.
 *
 * Output: one line per event on stdout ("vmhop-vsock: serve ADDR: conn N
 * open", "... conn N ended after B bytes: REASON", "... FAIL ..."); with a
 * STATUS file (not "-"), that file is rewritten after every change, one
 * line per connection: "conn=N state=open|ended bytes=B [reason=...]"
 * (the bytes checked so far: echoed back and compared, for a client;
 * received and checked, for a server). A client with "retry" connects
 * again a second after its connection ended or could not be made (a guest
 * whose transport was reset by a restore reconnects); without it the
 * client exits once its connection ends: 0 on end of file, 1 otherwise.
 * A server never exits by itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define ROUND 4096
#define PAUSE_MS 250
#define MAX_CONNS 64
#define RETRY_MS 1000

static const char *who = "";
static const char *status_path = NULL;

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	printf("vmhop-vsock: %s: ", who);
	vprintf(fmt, ap);
	printf("\n");
	fflush(stdout);
	va_end(ap);
}

static uint8_t pattern(uint64_t i)
{
	uint32_t w = (uint32_t)(i / 4) * 2654435761u;
	return (uint8_t)(w >> (8 * (i % 4)));
}

static void fill(uint8_t *buf, uint64_t from, size_t n)
{
	for (size_t k = 0; k < n; k++)
		buf[k] = pattern(from + k);
}

/* The first offset in buf (which starts at stream offset `from`) that is
 * not the stream's, or -1. */
static long mismatch(const uint8_t *buf, uint64_t from, size_t n)
{
	for (size_t k = 0; k < n; k++)
		if (buf[k] != pattern(from + k))
			return (long)k;
	return -1;
}

struct conn {
	int fd;
	unsigned id;
	uint64_t bytes;
	int open;
	char reason[96];
};

static struct conn conns[MAX_CONNS];
static unsigned nconns;

static void write_status(void)
{
	if (!status_path)
		return;
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", status_path);
	FILE *f = fopen(tmp, "w");
	if (!f) {
		say("FAIL cannot write %s: %s", tmp, strerror(errno));
		return;
	}
	for (unsigned k = 0; k < nconns; k++) {
		struct conn *c = &conns[k];
		fprintf(f, "conn=%u state=%s bytes=%llu", c->id, c->open ? "open" : "ended",
			(unsigned long long)c->bytes);
		if (!c->open)
			fprintf(f, " reason=%s", c->reason);
		fprintf(f, "\n");
	}
	fclose(f);
	if (rename(tmp, status_path) != 0)
		say("FAIL rename %s: %s", tmp, strerror(errno));
}

/* A new connection record; the oldest ended one goes when the table is
 * full (the status keeps the latest MAX_CONNS). */
static struct conn *add_conn(int fd, unsigned id)
{
	if (nconns == MAX_CONNS) {
		unsigned k = 0;
		while (k < nconns && conns[k].open)
			k++;
		if (k == nconns)
			return NULL;
		memmove(&conns[k], &conns[k + 1], (nconns - k - 1) * sizeof conns[0]);
		nconns--;
	}
	struct conn *c = &conns[nconns++];
	memset(c, 0, sizeof *c);
	c->fd = fd;
	c->id = id;
	c->open = 1;
	return c;
}

static void end_conn(struct conn *c, const char *reason)
{
	snprintf(c->reason, sizeof c->reason, "%s", reason);
	for (char *p = c->reason; *p; p++)
		if (*p == ' ')
			*p = '_';
	c->open = 0;
	close(c->fd);
	c->fd = -1;
	say("conn %u ended after %llu bytes: %s", c->id, (unsigned long long)c->bytes, reason);
	write_status();
}

static int write_all(int fd, const uint8_t *buf, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, buf, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		buf += w;
		n -= (size_t)w;
	}
	return 0;
}

static void sleep_ms(long ms)
{
	struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&t, &t) != 0 && errno == EINTR)
		;
}

/* --- addresses --------------------------------------------------------- */

struct addr {
	int vsock;
	unsigned cid, port;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

static int parse_u32(const char *s, unsigned *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > 0xffffffffUL)
		return -1;
	*out = (unsigned)v;
	return 0;
}

/* serve: vsock:PORT | unix:PATH; client: vsock:CID:PORT | unix:PATH:PORT */
static int parse_addr(const char *s, int client, struct addr *a)
{
	memset(a, 0, sizeof *a);
	if (strncmp(s, "vsock:", 6) == 0) {
		a->vsock = 1;
		const char *rest = s + 6;
		if (!client)
			return parse_u32(rest, &a->port);
		const char *colon = strchr(rest, ':');
		if (!colon)
			return -1;
		char cid[16];
		if ((size_t)(colon - rest) >= sizeof cid)
			return -1;
		memcpy(cid, rest, (size_t)(colon - rest));
		cid[colon - rest] = 0;
		return parse_u32(cid, &a->cid) || parse_u32(colon + 1, &a->port) ? -1 : 0;
	}
	if (strncmp(s, "unix:", 5) == 0) {
		const char *rest = s + 5;
		size_t len = strlen(rest);
		if (client) {
			const char *colon = strrchr(rest, ':');
			if (!colon || parse_u32(colon + 1, &a->port))
				return -1;
			len = (size_t)(colon - rest);
		}
		if (len == 0 || len >= sizeof a->path)
			return -1;
		memcpy(a->path, rest, len);
		a->path[len] = 0;
		return 0;
	}
	return -1;
}

static socklen_t sockaddr_of(const struct addr *a, int listen_any, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof *ss);
	if (a->vsock) {
		struct sockaddr_vm *v = (struct sockaddr_vm *)ss;
		v->svm_family = AF_VSOCK;
		v->svm_cid = listen_any ? VMADDR_CID_ANY : a->cid;
		v->svm_port = a->port;
		return sizeof *v;
	}
	struct sockaddr_un *u = (struct sockaddr_un *)ss;
	u->sun_family = AF_UNIX;
	strcpy(u->sun_path, a->path);
	return sizeof *u;
}

/* --- the server ---------------------------------------------------------- */

static int serve(const struct addr *a)
{
	struct sockaddr_storage ss;
	socklen_t len = sockaddr_of(a, 1, &ss);
	int l = socket(a->vsock ? AF_VSOCK : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0) {
		say("FAIL socket: %s", strerror(errno));
		return 1;
	}
	if (!a->vsock)
		unlink(a->path);
	if (bind(l, (struct sockaddr *)&ss, len) != 0 || listen(l, 8) != 0) {
		say("FAIL bind/listen: %s", strerror(errno));
		return 1;
	}
	say("listening");
	write_status();
	unsigned next_id = 1;
	static uint8_t buf[65536];
	for (;;) {
		struct pollfd p[MAX_CONNS + 1];
		struct conn *of[MAX_CONNS + 1];
		nfds_t n = 0;
		p[n].fd = l;
		p[n].events = POLLIN;
		of[n++] = NULL;
		for (unsigned k = 0; k < nconns; k++) {
			if (!conns[k].open)
				continue;
			p[n].fd = conns[k].fd;
			p[n].events = POLLIN;
			of[n++] = &conns[k];
		}
		if (poll(p, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			say("FAIL poll: %s", strerror(errno));
			return 1;
		}
		/* Connections first: accepting may move the table. */
		for (nfds_t k = 1; k < n; k++) {
			if (!p[k].revents)
				continue;
			struct conn *c = of[k];
			ssize_t r = read(c->fd, buf, sizeof buf);
			if (r < 0 && errno == EINTR)
				continue;
			if (r == 0) {
				end_conn(c, "eof");
				continue;
			}
			if (r < 0) {
				end_conn(c, strerror(errno));
				continue;
			}
			long bad = mismatch(buf, c->bytes, (size_t)r);
			if (bad >= 0) {
				char why[96];
				snprintf(why, sizeof why, "FAIL byte %llu is 0x%02x, the stream's is 0x%02x",
					 (unsigned long long)(c->bytes + (uint64_t)bad), buf[bad],
					 pattern(c->bytes + (uint64_t)bad));
				say("conn %u: %s", c->id, why);
				end_conn(c, why);
				continue;
			}
			c->bytes += (uint64_t)r;
			if (write_all(c->fd, buf, (size_t)r) != 0) {
				end_conn(c, strerror(errno));
				continue;
			}
			write_status();
		}
		if (p[0].revents) {
			struct sockaddr_storage peer;
			socklen_t plen = sizeof peer;
			int fd = accept4(l, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC);
			if (fd < 0) {
				if (errno != EINTR && errno != ECONNABORTED)
					say("accept: %s", strerror(errno));
				continue;
			}
			struct conn *c = add_conn(fd, next_id);
			if (!c) {
				say("FAIL more than %d connections open", MAX_CONNS);
				close(fd);
				continue;
			}
			next_id++;
			if (a->vsock) {
				struct sockaddr_vm *v = (struct sockaddr_vm *)&peer;
				say("conn %u open from cid %u port %u", c->id, v->svm_cid, v->svm_port);
			} else {
				say("conn %u open", c->id);
			}
			write_status();
		}
	}
}

/* --- the client ---------------------------------------------------------- */

/* Firecracker's host side: "CONNECT PORT\n", then one "OK ...\n" line. */
static int handshake(int fd, unsigned port, char *why, size_t whylen)
{
	char line[64];
	int n = snprintf(line, sizeof line, "CONNECT %u\n", port);
	if (write_all(fd, (uint8_t *)line, (size_t)n) != 0) {
		snprintf(why, whylen, "writing CONNECT: %s", strerror(errno));
		return -1;
	}
	size_t got = 0;
	for (;;) {
		char ch;
		ssize_t r = read(fd, &ch, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			snprintf(why, whylen, "no OK line after CONNECT %u: %s", port,
				 r == 0 ? "end of file" : strerror(errno));
			return -1;
		}
		if (ch == '\n')
			break;
		if (got + 1 >= sizeof line) {
			snprintf(why, whylen, "an answer to CONNECT %u longer than %zu bytes", port,
				 sizeof line);
			return -1;
		}
		line[got++] = ch;
	}
	line[got] = 0;
	if (strncmp(line, "OK ", 3) != 0) {
		snprintf(why, whylen, "CONNECT %u answered '%s', not OK <port>", port, line);
		return -1;
	}
	return 0;
}

static int dial(const struct addr *a, char *why, size_t whylen)
{
	struct sockaddr_storage ss;
	socklen_t len = sockaddr_of(a, 0, &ss);
	int fd = socket(a->vsock ? AF_VSOCK : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(why, whylen, "socket: %s", strerror(errno));
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&ss, len) != 0) {
		snprintf(why, whylen, "connect: %s", strerror(errno));
		close(fd);
		return -1;
	}
	if (!a->vsock && handshake(fd, a->port, why, whylen) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Rounds on one connection until it ends; 0 if it ended at end of file. */
static int rounds(struct conn *c)
{
	static uint8_t out[ROUND], in[ROUND];
	for (;;) {
		fill(out, c->bytes, ROUND);
		if (write_all(c->fd, out, ROUND) != 0) {
			end_conn(c, strerror(errno));
			return 1;
		}
		size_t got = 0;
		while (got < ROUND) {
			ssize_t r = read(c->fd, in + got, ROUND - got);
			if (r < 0 && errno == EINTR)
				continue;
			if (r == 0) {
				end_conn(c, "eof");
				return 0;
			}
			if (r < 0) {
				end_conn(c, strerror(errno));
				return 1;
			}
			got += (size_t)r;
		}
		long bad = mismatch(in, c->bytes, ROUND);
		if (bad >= 0) {
			char why[96];
			snprintf(why, sizeof why, "FAIL echoed byte %llu is 0x%02x, the stream's is 0x%02x",
				 (unsigned long long)(c->bytes + (uint64_t)bad), in[bad],
				 pattern(c->bytes + (uint64_t)bad));
			say("conn %u: %s", c->id, why);
			end_conn(c, why);
			return 1;
		}
		c->bytes += ROUND;
		write_status();
		sleep_ms(PAUSE_MS);
	}
}

static int client(const struct addr *a, int retry)
{
	unsigned id = 1;
	char last_why[128] = "";
	for (;;) {
		char why[128];
		int fd = dial(a, why, sizeof why);
		if (fd < 0) {
			if (!retry) {
				say("FAIL %s", why);
				return 1;
			}
			/* Said once per kind of failure, not once a second. */
			if (strcmp(why, last_why) != 0)
				say("cannot connect (retrying every %d ms): %s", RETRY_MS, why);
			snprintf(last_why, sizeof last_why, "%s", why);
			sleep_ms(RETRY_MS);
			continue;
		}
		last_why[0] = 0;
		struct conn *c = add_conn(fd, id++);
		if (!c) {
			say("FAIL the connection table is full");
			return 1;
		}
		say("conn %u open", c->id);
		write_status();
		int rc = rounds(c);
		if (!retry)
			return rc;
		sleep_ms(RETRY_MS);
	}
}

static int usage(void)
{
	fprintf(stderr, "usage: vmhop-vsock serve vsock:PORT|unix:PATH [STATUS]\n"
			"       vmhop-vsock client vsock:CID:PORT|unix:PATH:PORT [STATUS] [retry]\n");
	return 2;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return usage();
	int is_client = strcmp(argv[1], "client") == 0;
	if (!is_client && strcmp(argv[1], "serve") != 0)
		return usage();
	struct addr a;
	if (parse_addr(argv[2], is_client, &a) != 0) {
		fprintf(stderr, "vmhop-vsock: bad address '%s'\n", argv[2]);
		return usage();
	}
	static char tag[512];
	snprintf(tag, sizeof tag, "%s %s", argv[1], argv[2]);
	who = tag;
	if (argc > 3 && strcmp(argv[3], "-") != 0)
		status_path = argv[3];
	int retry = 0;
	if (argc > 4) {
		if (!is_client || strcmp(argv[4], "retry") != 0 || argc > 5)
			return usage();
		retry = 1;
	}
	/* A peer gone mid-write is an ended connection, not a dead tool. */
	signal(SIGPIPE, SIG_IGN);
	return is_client ? client(&a, retry) : serve(&a);
}
