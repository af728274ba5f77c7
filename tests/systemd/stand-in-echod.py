#!/usr/bin/python3
"""stand-in-echod.py -- a Python imitation of echod's contract with systemd,
for tests/systemd/nspawn-test.sh only (ECHOD_STAND_IN=1).

It lets the units and the nspawn harness be tested apart from the daemon:
when a check fails with the stand-in too, the fault is in the unit or the
harness, not in echod. It does what echod(8) promises systemd and nothing
more: `--config PATH`; binds `listen` (IPv6 sockets IPV6_V6ONLY) or takes
the sockets systemd passes (LISTEN_FDS/LISTEN_PID); forks `workers` workers
named echod-worker (the master is echod-master) that echo on the shared
listeners and die with the master (PR_SET_PDEATHSIG); sends READY=1 from the
master once they run, RELOADING=1 + MONOTONIC_USEC= then READY=1 at SIGHUP,
STOPPING=1 at SIGTERM/SIGINT/SIGQUIT; logs to stderr with <N> priority
prefixes; a reload with a bad config logs at err (<3>) and keeps serving.
It is not echod: one blocking connection at a time per worker, no timeouts.
"""

import ctypes
import os
import select
import signal
import socket
import sys
import time
import tomllib

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
role = "master"
# Taken out of the environment, so that the workers cannot notify (only the
# main pid may, NotifyAccess=main) and the socket does not leak into them.
NOTIFY_SOCKET = os.environ.pop("NOTIFY_SOCKET", None)


def log(prio, msg):
    sys.stderr.write(f"<{prio}>echod[{os.getpid()}] {role}: {msg}\n")
    sys.stderr.flush()


def notify(*lines):
    path = NOTIFY_SOCKET
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto("\n".join(lines).encode(), path)


def set_name(name):
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()), 0, 0, 0)


def load(path):
    with open(path, "rb") as f:
        conf = tomllib.load(f)
    workers = conf.get("workers", 2)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 512:
        raise ValueError(f"{path}: workers: expected an integer from 1 to 512, found {workers!r}")
    return {"workers": workers, "listen": conf.get("listen", ["127.0.0.1:7007", "[::1]:7007"])}


def bind(addr):
    host, port = addr.rsplit(":", 1)
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host.strip("[]"), int(port)))
    s.listen(511)
    return s


def worker(listeners, index, generation):
    global role
    role = f"worker {index} gen {generation}"
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    set_name("echod-worker")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(0)
    while True:
        ready, _, _ = select.select(listeners, [], [])
        for listener in ready:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.setblocking(True)
                while data := conn.recv(65536):
                    conn.sendall(data)


def main():
    global role
    args = sys.argv[1:]
    path = args[args.index("--config") + 1] if "--config" in args else "/etc/echod.toml"
    try:
        conf = load(path)
    except Exception as e:  # noqa: BLE001 - a stand-in reports everything alike
        print(f"echod: {e}", file=sys.stderr)
        sys.exit(78)
    set_name("echod-master")
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        n = int(os.environ.get("LISTEN_FDS", "0"))
        listeners = [socket.socket(fileno=3 + i) for i in range(n)]
        log(6, f"using {n} sockets from systemd (socket activation)")
    else:
        listeners = [bind(a) for a in conf["listen"]]
        for s in listeners:
            log(6, f"listening on {s.getsockname()[0]}:{s.getsockname()[1]}")
    for s in listeners:
        s.setblocking(False)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)

    pending = []
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, lambda n, _f: pending.append(n))
    generation, children = 1, {}

    def spawn(count):
        for i in range(count):
            pid = os.fork()
            if pid == 0:
                try:
                    worker(listeners, i, generation)
                finally:
                    os._exit(1)
            children[pid] = generation
            log(6, f"worker {i} (pid {pid}, gen {generation}) spawned")

    spawn(conf["workers"])
    notify("READY=1", f"STATUS=serving, generation {generation}, {conf['workers']} workers")
    stopping = False
    while True:
        time.sleep(0.05)
        while pending:
            sig = pending.pop(0)
            if sig == signal.SIGCHLD:
                continue
            if sig == signal.SIGHUP and not stopping:
                notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
                log(6, f"SIGHUP: reloading {path}")
                try:
                    new = load(path)
                except Exception as e:  # noqa: BLE001
                    log(3, f"reload failed, still serving generation {generation} with the old config: {e}")
                else:
                    generation += 1
                    log(6, f"reload: generation {generation} starts (workers {conf['workers']} -> {new['workers']}); generation {generation - 1} drains")
                    conf = new
                    old = [p for p, g in children.items() if g < generation]
                    spawn(conf["workers"])
                    for p in old:
                        os.kill(p, signal.SIGTERM)
                notify("READY=1", f"STATUS=serving, generation {generation}")
            elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) and not stopping:
                stopping = True
                notify("STOPPING=1")
                log(6, f"{signal.Signals(sig).name}: graceful stop; {len(children)} children drain")
                for p in children:
                    os.kill(p, signal.SIGTERM)
        while children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.pop(pid, None)
        if stopping and not children:
            log(6, f"master (pid {os.getpid()}) exiting")
            return 0


if __name__ == "__main__":
    sys.exit(main())
