/*
 * A test command runner for boot-once suites, as /init of the Linux
 * test initramfs is one (resources/linux/init): with
 * kvmrun.cmd="WORDS" (or kvmrun.cmd=WORD) on the command line, run
 * WORDS; with kvmrun.wait_cmd, print KVMRUN-READY, read one line from
 * COM1 and run it (`kvmrun test` snapshots the VM at the ready line and
 * types each test's command into a restore of it).
 *
 * Words: say:TEXT prints TEXT on a line of its own; count adds one to a
 * counter in guest memory and prints it (every restore starts from the
 * snapshot, so a test never sees another's count); exit:N makes N the
 * exit code (0 by default); hang never ends. The guest reports
 * "kvmrun: exit status N" and exits with N through isa-debug-exit.
 */
#include "guest.h"

#define COM1 0x3f8
#define LSR_DR 0x01
#define LINE_MAX 256

static char line[LINE_MAX];
static u64 counter;

/* The value of kvmrun.cmd on the raw command line: quoted or one word. */
static bool cmd_from_cmdline(void)
{
	const char *key = "kvmrun.cmd=";
	size_t n = strlen(key);
	for (const char *p = cmdline(); *p; p++) {
		if (strncmp(p, key, n) || (p != cmdline() && p[-1] != ' '))
			continue;
		p += n;
		char end = ' ';
		if (*p == '"') {
			end = '"';
			p++;
		}
		size_t i = 0;
		while (p[i] && p[i] != end && i < LINE_MAX - 1) {
			line[i] = p[i];
			i++;
		}
		line[i] = 0;
		return true;
	}
	return false;
}

/* One line from COM1, without its end; waits as long as it takes. */
static void read_line(void)
{
	size_t i = 0;
	for (;;) {
		while (!(inb(COM1 + 5) & LSR_DR))
			;
		char c = (char)inb(COM1);
		if (c == '\n' || c == '\r') {
			if (i == 0)
				continue;
			break;
		}
		if (i < LINE_MAX - 1)
			line[i++] = c;
	}
	line[i] = 0;
}

/* Parse a decimal number; false when `s` is not one. */
static bool parse_u32(const char *s, u32 *v)
{
	u64 x = 0;
	if (!*s)
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || x > 0xffffffffu / 10)
			return false;
		x = x * 10 + (u64)(*s - '0');
	}
	if (x > 0xffffffffu)
		return false;
	*v = (u32)x;
	return true;
}

int main(void)
{
	bool waited = false;
	if (!cmd_from_cmdline()) {
		if (!arg_str("kvmrun.wait_cmd")) {
			printf("no kvmrun.cmd and no kvmrun.wait_cmd on the command line\n");
			return EXIT_BAD_ARGS;
		}
		printf("KVMRUN-READY\n");
		read_line();
		waited = true;
	}
	printf("kvmrun: running: %s%s\n", line, waited ? " (from COM1)" : "");
	u32 status = 0;
	char *p = line;
	while (*p) {
		while (*p == ' ')
			*p++ = 0;
		if (!*p)
			break;
		char *word = p;
		while (*p && *p != ' ')
			p++;
		if (*p)
			*p++ = 0;
		if (!strncmp(word, "say:", 4)) {
			printf("%s\n", word + 4);
		} else if (!strncmp(word, "count", 6)) {
			counter++;
			printf("count=%lu\n", counter);
		} else if (!strncmp(word, "exit:", 5)) {
			if (!parse_u32(word + 5, &status)) {
				printf("bad exit code in '%s'\n", word);
				return EXIT_BAD_ARGS;
			}
		} else if (!strncmp(word, "hang", 5)) {
			for (;;)
				__asm__ volatile("pause");
		} else {
			printf("unknown word '%s'\n", word);
			return EXIT_BAD_ARGS;
		}
	}
	printf("kvmrun: exit status %u\n", status);
	exit((int)status);
}
