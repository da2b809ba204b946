"""A QEMU serial console on a unix socket (-serial unix:PATH,server=on), for the scripts that
drive a guest: wait for text on screen, type keys, wait for power-off. Everything received is
written to a log file."""
import re
import socket
import sys
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


class Console:
    def __init__(self, sock_path, log_path, who):
        self.who = who
        self.log = open(log_path, "wb")
        self.buf = b""  # received since the last match, escape sequences removed
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(600):
            try:
                self.s.connect(sock_path)
                return
            except OSError:
                time.sleep(0.1)
        self.fail("cannot connect to " + sock_path)

    def fail(self, why):
        # Power the guest off (best effort: a shell prompt takes it) so that the case ends now,
        # not at its boot timeout.
        try:
            self.s.sendall(b"\x03\rpoweroff -f\r")
        except OSError:
            pass
        sys.exit(f"{self.who}: {why}")

    def _read(self):
        """One read; False once QEMU has closed the console."""
        try:
            data = self.s.recv(4096)
        except socket.timeout:
            return True
        if not data:
            return False
        self.log.write(data)
        self.log.flush()
        self.buf = ANSI.sub(b"", self.buf + data)
        return True

    def search(self, pattern, timeout):
        """Wait for a regex; drop what came before the match and the match itself (what came
        after stays: one read often holds two prompts). The match, or None in time."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        end = time.time() + timeout
        self.s.settimeout(1)
        while True:
            m = rx.search(self.buf.replace(b"\r", b""))
            if m:
                self.buf = self.buf.replace(b"\r", b"")[m.end():]
                return m
            if time.time() >= end or not self._read():
                return None

    def seen(self, text, timeout):
        return self.search(re.escape(text), timeout) is not None

    def wait(self, text, timeout=600):
        if not self.seen(text, timeout):
            self.fail(f"timed out waiting for {text!r}")

    def send(self, keys):
        # Give the prompt time to put the terminal in raw mode: keys that arrive before are lost.
        time.sleep(1)
        self.s.sendall(keys.encode())

    def until_closed(self, timeout=120):
        """Read until QEMU exits (the guest powered off)."""
        end = time.time() + timeout
        self.s.settimeout(1)
        while time.time() < end:
            if not self._read():
                return
        self.fail("the machine did not power off")
