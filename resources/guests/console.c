/*
 * Drive a virtio-console with VIRTIO_CONSOLE_F_MULTIPORT through the
 * library's polling driver, as Linux's driver does: the control queues
 * first (DEVICE_READY, then PORT_READY for each DEVICE_ADD, PORT_OPEN
 * once named), then the ports by the names the device gave them
 * (PORT_NAME). The host names
 * two ports: "out" (kvmrun's stdout) and "in" (kvmrun's stdin).
 *
 * The guest writes "hello from the guest" to "out", reads one line from
 * "in" and writes it back as "echo: LINE". With `wait`, it then says
 * "waiting for a line" on COM1 and echoes one more line (a test
 * snapshots the VM there and restores it). With `eof`, it then waits
 * for the host to close "in" (PORT_OPEN 0, the end of stdin). With `bye`,
 * it makes "bye" available on "out" last, without a notification, and
 * ends: the host must still write it.
 */
#include "guest.h"

#define F_MULTIPORT (1u << 1)
#define DEVICE_READY 0
#define DEVICE_ADD 1
#define PORT_READY 3
#define PORT_OPEN 6
#define PORT_NAME 7
#define NCTRL 8
#define MAX_PORTS 4

struct control {
	u32 id;
	u16 event, value;
	char name[56];
};

static struct virtio_dev dev;
static struct virtq c_ivq, c_ovq, rxq[MAX_PORTS], txq[MAX_PORTS];
static struct control cin[NCTRL], cout;
static char rxbuf[MAX_PORTS][VIRTIO_QSIZE][64];
static char txbuf[128];
static char names[MAX_PORTS][56];
static int host_open[MAX_PORTS];
static u32 nports;

static u16 rx_index(u32 p) { return p == 0 ? 0 : 2 + 2 * p; }

/* Send one control message and wait for the device to take it. */
static void send_control(u32 id, u16 event, u16 value)
{
	u16 slot;
	u32 len;
	cout = (struct control){ id, event, value, { 0 } };
	virtq_offer(&dev, &c_ovq, &cout, 8, false);
	while (!virtq_used(&c_ovq, &slot, &len))
		;
}

/* Handle control messages until none is pending; true if any came. */
static bool poll_control(void)
{
	u16 slot;
	u32 len;
	bool any = false;
	while (virtq_used(&c_ivq, &slot, &len)) {
		struct control *m = &cin[slot % NCTRL];
		any = true;
		if (m->id < nports) {
			if (m->event == DEVICE_ADD) {
				send_control(m->id, PORT_READY, 1);
			} else if (m->event == PORT_NAME) {
				u32 n = len - 8 < 55 ? len - 8 : 55;
				memcpy(names[m->id], m->name, n);
				names[m->id][n] = 0;
			} else if (m->event == PORT_OPEN) {
				host_open[m->id] = m->value;
			}
		}
		virtq_offer(&dev, &c_ivq, m, sizeof(*m), true);
	}
	return any;
}

static int port_named(const char *name)
{
	for (u32 p = 0; p < nports; p++)
		if (!strncmp(names[p], name, 56))
			return (int)p;
	return -1;
}

static void port_write(int p, const char *s)
{
	u16 slot;
	u32 len;
	u32 n = strlen(s);
	memcpy(txbuf, s, n);
	virtq_offer(&dev, &txq[p], txbuf, n, false);
	while (!virtq_used(&txq[p], &slot, &len))
		;
}

/* Read one line (without its newline) from port `p` into `line`; its
 * length, or -1 at the end of the input (the host closed the port and
 * every byte before that was read: the device returns the buffers
 * before it sends PORT_OPEN 0). */
static int port_read_line(int p, char *line, u32 max)
{
	static u32 have;
	static char pend[256];
	u16 slot;
	u32 len;
	for (;;) {
		for (u32 i = 0; i < have; i++)
			if (pend[i] == '\n') {
				u32 n = i < max - 1 ? i : max - 1;
				memcpy(line, pend, n);
				line[n] = 0;
				memcpy(pend, pend + i + 1, have - i - 1);
				have -= i + 1;
				return (int)n;
			}
		poll_control();
		bool closed = !host_open[p];
		if (!virtq_used(&rxq[p], &slot, &len)) {
			if (closed)
				return -1;
			continue;
		}
		char *b = rxbuf[p][slot];
		for (u32 i = 0; i < len && have < sizeof(pend); i++)
			pend[have++] = b[i];
		virtq_offer(&dev, &rxq[p], b, 64, true);
	}
}

static bool bring_up(void)
{
	virtio_want_features(F_MULTIPORT);
	int bdf = pci_find(0x1af4, 0x1043);
	report(bdf >= 0, "pci-1af4-1043");
	if (bdf < 0 || !virtio_pci_start(&dev, bdf, 3))
		return false;
	report(dev.features & F_MULTIPORT, "multiport-feature");
	nports = mmio_read32(dev.device + 4);
	printf("max_nr_ports %u\n", nports);
	if (nports > MAX_PORTS)
		nports = MAX_PORTS;
	bool ok = virtio_queue_init(&dev, &c_ivq, 2) && virtio_queue_init(&dev, &c_ovq, 3);
	for (u32 p = 0; p < nports; p++)
		ok = ok && virtio_queue_init(&dev, &rxq[p], rx_index(p)) &&
		     virtio_queue_init(&dev, &txq[p], rx_index(p) + 1);
	if (!ok)
		return false;
	virtio_driver_ok(&dev);
	for (u32 i = 0; i < NCTRL; i++)
		virtq_offer(&dev, &c_ivq, &cin[i], sizeof(cin[i]), true);
	for (u32 p = 0; p < nports; p++)
		for (u32 i = 0; i < VIRTIO_QSIZE; i++)
			virtq_offer(&dev, &rxq[p], rxbuf[p][i], 64, true);
	send_control(0, DEVICE_READY, 1);
	/* Every port named and open: the device answers each PORT_READY. */
	for (;;) {
		poll_control();
		u32 named = 0;
		for (u32 p = 0; p < nports; p++)
			named += names[p][0] != 0;
		if (named == nports)
			break;
	}
	/* As a program opening each /dev/vport does: input waits for it. */
	for (u32 p = 0; p < nports; p++)
		send_control(p, PORT_OPEN, 1);
	return true;
}

static void echo_line(int in, int out)
{
	char line[64], msg[96];
	if (port_read_line(in, line, sizeof(line)) < 0) {
		port_write(out, "eof\n");
		return;
	}
	memcpy(msg, "echo: ", 6);
	u32 n = strlen(line);
	memcpy(msg + 6, line, n);
	msg[6 + n] = '\n';
	msg[7 + n] = 0;
	port_write(out, msg);
}

int main(void)
{
	bool up = bring_up();
	report(up, "virtio-init");
	if (!up)
		return report_summary();
	int out = port_named("out"), in = port_named("in");
	report(out >= 0 && in >= 0, "ports-named");
	if (out < 0 || in < 0)
		return report_summary();
	report(host_open[out], "out-host-open");
	port_write(out, "hello from the guest\n");
	echo_line(in, out);
	if (arg_str("wait")) {
		printf("waiting for a line\n");
		echo_line(in, out);
		report(true, "echo-after-wait");
	}
	if (arg_str("eof")) {
		while (host_open[in])
			poll_control();
		report(true, "in-closed-at-eof");
	}
	if (arg_str("bye")) {
		/* Made available without a notification, and not waited
		 * for: the guest ends first, which only a last look at the
		 * queues at the VM's end serves (Linux's port writes return
		 * before the device took the bytes, and its power-off can
		 * overtake the notification). */
		static char bye[] = "bye\n";
		struct virtq *q = &txq[out];
		u16 slot = q->avail.idx % VIRTIO_QSIZE;
		q->desc[slot] = (struct virtio_desc){ (u64)bye, 4, 0, 0 };
		q->avail.ring[slot] = slot;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		q->avail.idx++;
	}
	return report_summary();
}
