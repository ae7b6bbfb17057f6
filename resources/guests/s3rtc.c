/*
 * The CMOS RTC, then an ACPI S3 suspend: the guest checks the clock and the
 * CMOS memory fields, points the FACS waking vector at a real-mode stub, and
 * enters S3. Only a resume through the waking vector reaches the stub, which
 * exits with the code stored at physical address 0 (0 = pass). Staying in
 * main after the sleep request stores 1 there, so a VMM that does not
 * suspend, or resumes in place, fails.
 */
#include "guest.h"

#define RTC_INDEX 0x70
#define RTC_DATA 0x71
#define RTC_SECONDS 0x00
#define RTC_YEAR 0x09
#define RTC_REG_A 0x0a
#define RTC_REG_B 0x0b
#define RTC_REG_C 0x0c
#define RTC_REG_D 0x0d
#define RTC_SECONDS_ALARM 0x01
#define RTC_MINUTES_ALARM 0x03
#define RTC_HOURS_ALARM 0x05
#define RTC_DONT_CARE 0xc0
#define RTC_AIE 0x20
#define RTC_UIP 0x80
#define RTC_BINARY 0x04
#define RTC_VRT 0x80

#define FADT_FIRMWARE_CTRL 36
#define FADT_PM1A_EVT_BLK 56
#define FADT_PM1A_CNT_BLK 64
#define FACS_WAKING_VECTOR 12
#define PM1_EN_RTC (1u << 10)
#define SLP_TYP_S3 (1u << 10)
#define SLP_EN (1u << 13)

#define WAKE_STUB 0x1000ul

/* 16-bit: mov eax, [0]; mov dx, 0xf4; out dx, eax; 1: hlt; jmp 1b */
static const u8 wake_stub[] = { 0x66, 0xa1, 0x00, 0x00, 0xba, 0xf4, 0x00,
				0x66, 0xef, 0xf4, 0xeb, 0xfd };

static u8 rtc(u8 reg)
{
	outb(RTC_INDEX, reg);
	return inb(RTC_DATA);
}

static void rtc_write(u8 reg, u8 v)
{
	outb(RTC_INDEX, reg);
	outb(RTC_DATA, v);
}

static u32 rd32(u64 addr) { return *(volatile u32 *)addr; }

/* Store to physical address 0 without the compiler seeing a null pointer. */
static void store_at_zero(u32 v)
{
	u64 zero = 0;
	__asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(zero) : "memory");
}

/* Wait for the update-in-progress bit to rise and fall: one RTC update.
 * A clock that never updates hangs the guest until the host's timeout. */
static void wait_update(void)
{
	while (!(rtc(RTC_REG_A) & RTC_UIP))
		;
	while (rtc(RTC_REG_A) & RTC_UIP)
		;
}

static u64 find_table(const char *sig)
{
	u64 rsdp = 0;
	for (u64 a = 0xe0000; a < 0x100000 && !rsdp; a += 16)
		if (!memcmp((void *)a, "RSD PTR ", 8))
			rsdp = a;
	if (!rsdp)
		return 0;
	u8 rev = *(u8 *)(rsdp + 15);
	u64 root = rev >= 2 ? *(u64 *)(rsdp + 24) : rd32(rsdp + 16);
	u32 entry = rev >= 2 ? 8 : 4;
	u32 len = rd32(root + 4);
	for (u32 off = 36; off + entry <= len; off += entry) {
		u64 t = entry == 8 ? *(u64 *)(root + off) : rd32(root + off);
		if (!memcmp((void *)t, sig, 4))
			return t;
	}
	return 0;
}

int main(void)
{
	report(rtc(RTC_REG_D) & RTC_VRT, "rtc-valid");
	bool binary = rtc(RTC_REG_B) & RTC_BINARY;
	u8 year = rtc(RTC_YEAR);
	u8 y = binary ? year : (u8)((year >> 4) * 10 + (year & 0xf));
	printf("RTC year: 20%02u\n", y);
	report(y >= 24 && y < 100, "rtc-year");
	u8 s0 = rtc(RTC_SECONDS);
	wait_update();
	report(rtc(RTC_SECONDS) != s0, "rtc-seconds-advance");

	u64 ram = fwcfg_read(FW_CFG_RAM_SIZE, 8);
	if (ram <= (3ull << 30)) {
		u32 above16 = rtc(0x34) | (u32)rtc(0x35) << 8;
		u64 want = ram > (16u << 20) ? (ram - (16u << 20)) >> 16 : 0;
		if (want > 0xffff)
			want = 0xffff;
		printf("CMOS memory above 16 MiB: %u x 64 KiB\n", above16);
		report(above16 == want, "cmos-memory-size");
	}

	u64 fadt = find_table("FACP");
	report(fadt != 0, "fadt");
	if (!fadt || report_summary() != 0)
		return EXIT_FAIL;

	u64 facs = rd32(fadt + FADT_FIRMWARE_CTRL);
	u16 pm1a_evt = (u16)rd32(fadt + FADT_PM1A_EVT_BLK);
	u16 pm1a_cnt = (u16)rd32(fadt + FADT_PM1A_CNT_BLK);
	memcpy((void *)WAKE_STUB, wake_stub, sizeof(wake_stub));
	*(volatile u32 *)(facs + FACS_WAKING_VECTOR) = WAKE_STUB;
	/* Wake on the next RTC alarm: any second, minute and hour. */
	outw(pm1a_evt + 2, PM1_EN_RTC);
	wait_update();
	rtc(RTC_REG_C);
	rtc_write(RTC_SECONDS_ALARM, RTC_DONT_CARE);
	rtc_write(RTC_MINUTES_ALARM, RTC_DONT_CARE);
	rtc_write(RTC_HOURS_ALARM, RTC_DONT_CARE);
	rtc_write(RTC_REG_B, rtc(RTC_REG_B) | RTC_AIE);
	printf("entering S3\n");
	store_at_zero(EXIT_PASS);
	outw(pm1a_cnt, SLP_TYP_S3 | SLP_EN);
	for (;;)
		store_at_zero(EXIT_FAIL);
}
