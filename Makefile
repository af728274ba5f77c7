# echod — build, run, test and install.
#
#   make run      run echod in the foreground on the built-in defaults
#                 (127.0.0.1:7007 and [::1]:7007; no root needed)
#   make test     the whole test suite (unit + integration, real binary)
#   make lint     rustfmt --check and clippy -D warnings
#   make bench    echod against a tokio reference, side by side
#   make fuzz     fuzz the config parser, FUZZ_SECS (60) per target
#                 (nightly + cargo-fuzz, installed if missing)
#   make soak     the kill-and-reload soak alone, SOAK_SECS (60) long
#   make install  PREFIX=/usr/local DESTDIR=  (see README "Install as a service")

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
MANDIR  ?= $(PREFIX)/share/man

.PHONY: build release run test lint bench clean

build:
	$(CARGO) build --all-targets

release:
	$(CARGO) build --release --bins

run:
	$(CARGO) run --release --bin echod

test:
	$(CARGO) test --all-targets -- --test-threads=4

lint:
	$(CARGO) fmt --all -- --check
	rustfmt --edition 2021 --check fuzz/fuzz_targets/*.rs
	$(CARGO) clippy --all-targets -- -D warnings

bench:
	bash scripts/bench.sh

FUZZ_SECS ?= 60
SOAK_SECS ?= 60
.PHONY: fuzz soak

fuzz:
	bash fuzz/run.sh $(FUZZ_SECS)

soak:
	ECHOD_SOAK_SECS=$(SOAK_SECS) $(CARGO) test --test soak -- --nocapture

clean:
	$(CARGO) clean

# --- Install as a service ------------------------------------------------------
#
#   make install    [PREFIX=/usr/local] [DESTDIR=] [SYSCONFDIR=/etc] [UNITDIR=...]
#   make uninstall  (the same variables as at install)
#   make test-systemd   echod under a real systemd in systemd-nspawn (root)
#
# install puts, under $(DESTDIR):
#   $(BINDIR)/echod                        the binary (ECHOD_BIN, built if stale)
#   $(SYSCONFDIR)/echod.toml               the config; one changed since the
#                                          last install is kept, and the new
#                                          default goes to echod.toml.new
#   $(UNITDIR)/echod.service, echod.socket with ExecStart= pointing at the two above
#   $(MANDIR)/man8/echod.8, man5/echod.toml.5
#   $(DOCDIR)/echod.toml                   the shipped default config, which
#                                          install and uninstall compare
#                                          $(SYSCONFDIR)/echod.toml with
# UNITDIR defaults to $(PREFIX)/lib/systemd/system: systemd (252 here) searches
# /usr/local/lib/systemd/system and /usr/lib/systemd/system (see
# `systemd-analyze unit-paths`), but not other prefixes such as /opt/echod;
# there, or to shadow a distribution's unit, use UNITDIR=/etc/systemd/system.

BINDIR  ?= $(PREFIX)/bin
DOCDIR  ?= $(PREFIX)/share/doc/echod
# The binary that install copies. cargo writes it under CARGO_TARGET_DIR when
# that is set in the environment.
ECHOD_BIN ?= $(or $(CARGO_TARGET_DIR),target)/release/echod
# Only what the echod binary is built from, so that a fresh build satisfies
# make and `sudo make install` after `cargo build --release` runs no cargo.
ECHOD_SRC := Cargo.toml Cargo.lock $(wildcard src/*.rs)
UNITS   := echod.service echod.socket
INSTALL ?= install
# systemd running as PID 1 on this machine, and a real (not DESTDIR) install.
LIVE_SYSTEMD = [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]

.PHONY: install uninstall test-systemd

# cargo builds into the target directory ECHOD_BIN names; touch, because
# cargo leaves a binary that is already fresh in its own view untouched.
$(ECHOD_BIN): $(ECHOD_SRC)
	@case "$@" in */release/echod) ;; *) \
		echo "$@ is missing or older than the sources, and not in a cargo target directory" >&2; exit 1;; esac
	CARGO_TARGET_DIR=$(abspath $(@:%/release/echod=%)) $(CARGO) build --release --bin echod
	@touch $@

install: $(ECHOD_BIN)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSCONFDIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 0755 $(ECHOD_BIN) $(DESTDIR)$(BINDIR)/echod
	@conf=$(DESTDIR)$(SYSCONFDIR)/echod.toml; ref=$(DESTDIR)$(DOCDIR)/echod.toml; \
	if [ ! -e $$conf ]; then \
		echo "$(INSTALL) -m 0644 etc/echod.toml $$conf"; \
		$(INSTALL) -m 0644 etc/echod.toml $$conf; \
	elif cmp -s etc/echod.toml $$conf; then \
		echo "$$conf is up to date"; \
	elif [ -e $$ref ] && cmp -s $$ref $$conf; then \
		echo "$(INSTALL) -m 0644 etc/echod.toml $$conf  (it was the previous default)"; \
		$(INSTALL) -m 0644 etc/echod.toml $$conf; \
	else \
		$(INSTALL) -m 0644 etc/echod.toml $$conf.new; \
		echo "NOTE: kept the existing $$conf; the new default is $$conf.new"; \
	fi
	$(INSTALL) -m 0644 etc/echod.toml $(DESTDIR)$(DOCDIR)/echod.toml
	@for u in $(UNITS); do \
		echo "$(INSTALL) -m 0644 systemd/$$u $(DESTDIR)$(UNITDIR)/$$u"; \
		sed -e 's|/usr/local/bin/echod|$(BINDIR)/echod|g' \
		    -e 's|/etc/echod.toml|$(SYSCONFDIR)/echod.toml|g' \
		    systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u.tmp && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp && \
		mv -f $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	$(INSTALL) -m 0644 man/echod.8 $(DESTDIR)$(MANDIR)/man8/echod.8
	$(INSTALL) -m 0644 man/echod.toml.5 $(DESTDIR)$(MANDIR)/man5/echod.toml.5
	@if $(LIVE_SYSTEMD); then echo "systemctl daemon-reload"; systemctl daemon-reload; fi

uninstall:
	@if $(LIVE_SYSTEMD); then \
		echo "systemctl disable --now echod.socket echod.service"; \
		systemctl disable --now echod.socket echod.service || true; \
	fi
	rm -f $(DESTDIR)$(BINDIR)/echod
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	rm -f $(DESTDIR)$(MANDIR)/man8/echod.8 $(DESTDIR)$(MANDIR)/man5/echod.toml.5
	@conf=$(DESTDIR)$(SYSCONFDIR)/echod.toml; ref=$(DESTDIR)$(DOCDIR)/echod.toml; \
	for f in $$conf $$conf.new; do \
		[ -e $$f ] || continue; \
		if [ -e $$ref ] && cmp -s $$ref $$f; then \
			echo "rm -f $$f"; rm -f $$f; \
		else \
			echo "NOTE: kept $$f: it differs from the installed default"; \
		fi; \
	done
	rm -f $(DESTDIR)$(DOCDIR)/echod.toml
	rmdir --ignore-fail-on-non-empty $(DESTDIR)$(DOCDIR) 2>/dev/null || true
	@if $(LIVE_SYSTEMD); then echo "systemctl daemon-reload"; systemctl daemon-reload; fi

test-systemd: $(ECHOD_BIN)
	ECHOD_BIN=$(abspath $(ECHOD_BIN)) bash tests/systemd/nspawn-test.sh
