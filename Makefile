# kvmrun's front door. `make run` boots the demo guest; `make test` installs
# what is missing, builds the guests and runs every test.

CARGO    ?= cargo
GUESTS   := $(abspath build/guests)
KVMRUN   := target/release/kvmrun
# Debian packages the build and the tests need, and those the benchmarks
# add; installed only when absent.
APT_PKGS   := gcc make binutils gdb
BENCH_PKGS := qemu-system-x86 hyperfine time
# The functional-test Linux guest: Debian's cloud kernel (downloaded and
# unpacked under build/linux, never installed), busybox, and the tools that
# pack the initramfs and unpack the kernel (zstd, python3).
LINUX_PKGS := busybox-static cpio zstd python3
LINUX      := $(abspath build/linux)
# The AMD-V host (scripts/amdv): QEMU's TCG emulates AMD-V for L1;
# e2fsprogs' mke2fs and e2fsck go into L1 for the ext4 disk check.
AMDV_PKGS  := qemu-system-x86 e2fsprogs
AMDV       := $(abspath build/amdv)

# Seconds each fuzz target runs in `make fuzz` (scripts/fuzz).
FUZZ_TIME ?= 60

.PHONY: all build guests init linux amdv run test test-amdv deps bench-deps apt lint bench fuzz soak clean

all: build guests init

build:
	$(CARGO) build --release

# kvmrun-init, the /init of `kvmrun run --rootfs` (resources/rootfs).
init:
	$(MAKE) -C resources/rootfs OUT=$(abspath build/rootfs)

guests:
	$(MAKE) -C resources/guests OUT=$(GUESTS)

linux:
	@$(MAKE) --no-print-directory apt PKGS="$(LINUX_PKGS)"
	$(MAKE) -C resources/linux OUT=$(LINUX)

amdv: linux
	@$(MAKE) --no-print-directory apt PKGS="$(AMDV_PKGS)"
	$(MAKE) -C resources/amdv OUT=$(AMDV) LINUX=$(LINUX)

# The demo ends through isa-debug-exit with 0, which kvmrun reports as
# status 1 (QEMU's (v << 1) | 1): that is success here.
run: build guests
	@$(KVMRUN) run $(GUESTS)/demo.elf --smp 2; s=$$?; \
	if [ $$s -ne 1 ]; then echo "demo guest failed: kvmrun exit status $$s" >&2; exit 1; fi

deps:
	@$(MAKE) --no-print-directory apt PKGS="$(APT_PKGS)"

bench-deps:
	@$(MAKE) --no-print-directory apt PKGS="$(BENCH_PKGS)"

apt:
	@missing=""; for p in $(PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# KVMRUN_AMDV=1: tests/linux_hw.rs boots the AMD-V host (QEMU TCG) once
# and asserts on its Linux batch, about 9-13 minutes (docs/TESTHOST.md).
# --no-fail-fast: a failing test binary does not hide the verdicts of the
# binaries after it.
test: deps guests init amdv build lint
	KVMRUN_AMDV=1 $(CARGO) test --workspace --no-fail-fast

# The AMD-V host's Linux batch alone.
test-amdv: deps guests init amdv build
	KVMRUN_AMDV=1 $(CARGO) test --release --test linux_hw

bench: bench-deps build guests amdv
	scripts/bench

# Every fuzz target for FUZZ_TIME seconds, one after the other (make test
# only replays their seeds).
fuzz:
	scripts/fuzz $(FUZZ_TIME)

# The long soaks of tests/soak.rs (make test runs short ones).
soak: deps guests
	scripts/soak

clean:
	$(CARGO) clean
	rm -rf build
