"""Drive one smoke boot over the guest's serial console (QEMU with -serial stdio).

usage: smoke_console.py LOG MENU -- QEMU_COMMAND...

MENU says how the shell-before-restore entry is chosen: `grub` (press its hotkey s),
`pxelinux` (type the label "shell" at boot:) or `none` (bmr.break is already on the command
line). Then: take the shell, check bmr's version, the blank virtio disk, a loaded module and
the network card's driver, and power off. Everything the guest prints goes to LOG. Exit 0 on
success; otherwise the last line on stderr says what went wrong."""
import os
import re
import select
import subprocess
import sys
import time

STEP = 240  # seconds for any one step; TCG boots take 10-60 s, more on a busy machine
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>]")

log_path, menu = sys.argv[1], sys.argv[2]
assert sys.argv[3] == "--"
cmd = sys.argv[4:]

log = open(log_path, "wb")
qemu = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
os.set_blocking(qemu.stdout.fileno(), False)
text = b""  # everything received, escape sequences removed
pos = 0  # where the next search starts


def fail(why):
    if qemu.poll() is None:
        qemu.kill()
    print(why, file=sys.stderr)
    sys.exit(1)


def pump(timeout):
    """Read what QEMU printed within `timeout` seconds; False once it has exited."""
    global text
    r, _, _ = select.select([qemu.stdout], [], [], timeout)
    if not r:
        return True
    data = qemu.stdout.read()
    if data is None:
        return True
    if not data:
        return False
    log.write(data)
    log.flush()
    text += ANSI.sub(b"", data).replace(b"\r", b"")
    return True


def expect(pattern, what, timeout=STEP):
    """Wait for a regex in the output after the last match; returns the match."""
    global pos
    rx = re.compile(pattern.encode())
    end = time.time() + timeout
    while time.time() < end:
        m = rx.search(text, pos)
        if m:
            pos = m.end()
            return m
        if not pump(1):
            m = rx.search(text, pos)
            if m:
                pos = m.end()
                return m
            fail(f"QEMU exited (status {qemu.wait()}) while waiting for {what}")
    fail(f"timed out after {timeout} s waiting for {what}")


def send(s):
    time.sleep(0.3)
    qemu.stdin.write(s.encode())
    qemu.stdin.flush()


if menu == "grub":
    expect(r"shell before restore", "the GRUB menu")
    send("s")
elif menu == "pxelinux":
    expect(r"boot:", "the pxelinux boot: prompt")
    send("shell\r")
expect(r"bmr rescue system: Linux \S+", "the init's banner")
expect(r"Press Enter for a shell on this console \(ttyS0\)", "the bmr.break shell offer")
send("\r")
expect(r"bmr-rescue:\S*# ", "the shell prompt")

# Markers are joined by the shell ("@@X""=") so the echoed command line cannot match them, and
# each is read up to its newline (output arrives in pieces).
send('echo "@@VERSION""=$(/bin/bmr --version)"\r')
expect(r"@@VERSION=bmr \d+\.\d+[^\n]*\n", "bmr --version")

def wait_listed(sysdir, name, marker, what):
    """Wait up to 60 s in the guest for SYSDIR/NAME (late devices), then check it is listed."""
    send(f'for i in $(seq 60); do [ -e {sysdir}/{name} ] && break; sleep 1; done; '
         f'echo "@@{marker}""=" $(ls {sysdir})\r')
    m = expect(rf"@@{marker}= ([^\n]*)\n", f"ls {sysdir}")
    if name.encode() not in m.group(1).split():
        fail(f"{what}: {sysdir} has {m.group(1).decode(errors='replace')}")


wait_listed("/sys/block", "vda", "BLOCK", "no virtio disk")
send('echo "@@EXT4""=$(grep -c "^ext4 " /proc/modules)"\r')
m = expect(r"@@EXT4=(\d+)\n", "the ext4 check")
if m.group(1) != b"1":
    fail("ext4 is not loaded")
wait_listed("/sys/class/net", "eth0", "NET", "the network card has no driver")
send("poweroff -f\r")
end = time.time() + STEP
while time.time() < end and pump(1):
    pass
try:
    rc = qemu.wait(timeout=10)
except subprocess.TimeoutExpired:
    fail("the guest did not power off")
if rc != 0:
    fail(f"QEMU exited with status {rc} after poweroff")
