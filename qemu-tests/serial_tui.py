"""Drive bmr's TUI over a QEMU serial console (a unix socket): pick the URL entry, type the
repository URL, take the newest point of the host, the first disk, answer the grow question,
confirm by typing the disk's name, wait for the restore, then choose "Power off". Everything
received is written to LOG.

usage: serial_tui.py SOCKET REPO_URL LOG [--host NAME] [--target vda] [--grow]"""
import argparse
import re
import socket
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("sock_path")
ap.add_argument("url")
ap.add_argument("log_path")
ap.add_argument("--host", default="sample")
ap.add_argument("--target", default="vda")
ap.add_argument("--grow", action="store_true")
args = ap.parse_args()
sock_path, url, log_path = args.sock_path, args.url, args.log_path
log = open(log_path, "wb")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(600):
    try:
        s.connect(sock_path)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("serial_tui: cannot connect to " + sock_path)

buf = b""
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def seen(text, timeout):
    """Read until `text` appears (escape sequences removed) and drop what came before it and
    the text itself; what arrived after it stays, since one read often holds two prompts.
    False when `text` does not come in time."""
    global buf
    end = time.time() + timeout
    s.settimeout(1)
    while time.time() < end:
        plain = ANSI.sub(b"", buf)
        i = plain.find(text.encode())
        if i >= 0:
            buf = plain[i + len(text):]
            return True
        try:
            data = s.recv(4096)
        except socket.timeout:
            continue
        if not data:
            return False
        log.write(data)
        log.flush()
        buf += data
    return False


def wait(text, timeout=600):
    if not seen(text, timeout):
        sys.exit(f"serial_tui: timed out waiting for {text!r}")


def send(keys):
    # Give the prompt time to put the terminal in raw mode: keys that arrive before are lost.
    time.sleep(1)
    s.sendall(keys.encode())


wait("press Enter to start on this console", 300)
send("\r")
wait("Repository")
send("\r")  # "Enter a URL": the first entry when no local repository was found
wait("Repository URL")
send(url + "\r")
wait(f"Point in time for {args.host}")
send("\r")
wait("Target disk")
send("\r")
wait("Read everything back")
send("\r")
wait("grow the last partition")  # the target is bigger than the source disk
send("y" if args.grow else "n")
wait(f"Type {args.target} to start")
send(args.target + "\r")
wait("Done:", 900)
wait("Next")
# From "Reboot" down to "Power off"; checked on screen, since a key sent while the menu is
# still being drawn is lost.
for _ in range(5):
    send("j")
    if seen("> Power off", 20):
        break
else:
    sys.exit("serial_tui: the Next menu did not move to Power off")
send("\r")
# Until QEMU exits on power-off.
s.settimeout(120)
try:
    while True:
        data = s.recv(4096)
        if not data:
            break
        log.write(data)
except socket.timeout:
    sys.exit("serial_tui: the machine did not power off")
