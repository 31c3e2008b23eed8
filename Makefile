# Everything a fresh Debian 12 machine (as root) needs, then the demo or every test tier.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD := .build
COLLECTIONS := $(CURDIR)/$(BUILD)/collections
VERSION := $(shell sed -n 's/^version: *//p' galaxy.yml)
TARBALL := $(BUILD)/guestvault-backup-$(VERSION).tar.gz
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export ANSIBLE_NOCOLOR := 1
SYSTEM_PACKAGES := qemu-system-x86 qemu-utils python3-venv git shellcheck zstd ovmf systemd openssh-server e2fsprogs python3-libnbd
# Only the benchmarks need these: the peers of bench/datastore_bench.py (borg, restic) and the
# plain uploader of bench/s3_bench.py (rclone).
BENCH_PACKAGES := borgbackup restic rclone
# LXC containers (issue 22): without lxc's recommends (apparmor, lxcfs, dnsmasq, uidmap), which
# would change how containers start on the node and are not needed to back them up.
CONTAINER_PACKAGES := lxc rsync btrfs-progs busybox-static pigz lzop
# Notifications (issue 23): a real sendmail for the sendmail target's tests, relaying to the
# tests' loopback SMTP server (msmtp reads its relay from the test's $HOME/.msmtprc).
NOTIFY_PACKAGES := msmtp-mta

.PHONY: demo test deps bench-deps install-packages venv collection unit integration sanity molecule bench clean

demo: deps venv collection
	$(VENV)/bin/ansible-playbook -i playbooks/inventory/localhost.yml playbooks/demo.yml

test: deps venv collection unit integration molecule sanity

deps:
	@$(MAKE) --no-print-directory install-packages PACKAGES="$(SYSTEM_PACKAGES)"
	@$(MAKE) --no-print-directory install-packages PACKAGES="$(CONTAINER_PACKAGES)" \
	  APT_FLAGS=--no-install-recommends
	@$(MAKE) --no-print-directory install-packages PACKAGES="$(NOTIFY_PACKAGES)" \
	  APT_FLAGS=--no-install-recommends

bench-deps:
	@$(MAKE) --no-print-directory install-packages PACKAGES="$(SYSTEM_PACKAGES) $(BENCH_PACKAGES)"
	@$(MAKE) --no-print-directory install-packages PACKAGES="$(CONTAINER_PACKAGES)" \
	  APT_FLAGS=--no-install-recommends

install-packages:
	@missing=""; for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_FLAGS) $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

# libnbd (pull capture over NBD) is not on PyPI: link Debian's binding, only it, when its ABI fits.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	$(PYTHON) tools/link_debian_nbd.py $(PY)
	touch $@

# Build the collection and install it as users do, so the demo and tests run the shipped files.
collection: venv
	rm -rf $(BUILD)/collections $(TARBALL)
	mkdir -p $(BUILD)
	$(VENV)/bin/ansible-galaxy collection build --force --output-path $(BUILD) >/dev/null
	$(VENV)/bin/ansible-galaxy collection install --force -p $(COLLECTIONS) $(TARBALL) >/dev/null
	@echo "installed guestvault.backup $(VERSION) into $(COLLECTIONS)"

# pytest exits 5 when a tier collects no test: say so loudly, but an empty tier is not a failure.
PYTEST = run_pytest() { $(PY) -m pytest -q "$$@" || { rc=$$?; if [ $$rc -eq 5 ]; then echo "WARNING: no tests collected in $$*"; else exit $$rc; fi; }; }; run_pytest

unit: venv
	$(PYTEST) tests/unit

# Integration tests mostly wait on QEMU, ssh, systemd and downloads: each module on one worker
# (a module's guests, nodes and fixtures stay together). On 2 cores the CPU was a third idle with
# two workers; three took 11m47s where two took 12m50s, in one fresh clone under the same load.
INTEGRATION_WORKERS ?= 3
integration: venv collection
	$(PYTEST) -n $(INTEGRATION_WORKERS) --dist loadfile --durations=15 tests/integration

# Each role's molecule scenario: converge, idempotence, verify on this machine.
molecule: venv collection
	for role in node backup_schedule; do \
	  (cd roles/$$role && PATH=$(CURDIR)/$(VENV)/bin:$$PATH molecule test); \
	done

sanity: venv
	VENV=$(VENV) tests/sanity/run-sanity.sh

# Each bench's output also goes to $(BENCH_OUT)/NAME.log, between the load averages before and
# after it, and its figures to NAME.json where it has --json: bench/summary.py then prints every
# goal of issue 24 with its verdict and those loads, in one place.
BENCH_OUT := $(BUILD)/bench
BENCH_RUN = run_bench() { name=$$1; shift; { \
	  echo "load average before: $$(cut -d' ' -f1-3 /proc/loadavg)"; $(PY) bench/$$name.py "$$@"; \
	  echo "load average after: $$(cut -d' ' -f1-3 /proc/loadavg)"; } | tee $(BENCH_OUT)/$$name.log; }; run_bench

bench: bench-deps venv
	rm -rf $(BENCH_OUT) && mkdir -p $(BENCH_OUT)
	$(BENCH_RUN) prune_bench --json $(BENCH_OUT)/prune_bench.json
	$(BENCH_RUN) backup_bench --json $(BENCH_OUT)/backup_bench.json
	$(BENCH_RUN) datastore_bench --json $(BENCH_OUT)/datastore_bench.json
	$(BENCH_RUN) s3_bench
	$(BENCH_RUN) restore_bench
	$(BENCH_RUN) live_restore_bench
	$(BENCH_RUN) file_restore_bench
	$(BENCH_RUN) container_bench --json $(BENCH_OUT)/container_bench.json
	$(PY) bench/summary.py $(BENCH_OUT)

clean:
	rm -rf $(BUILD) tests/output
