"""Run a script in the rescue system's shell over a QEMU serial console (a unix socket).

usage: serial_shell.py SOCKET LOG SCRIPT [--after-result]

Takes the console shell (bmr.break, or the one after bmr rescue ends: --after-result first
waits for the BMR-RESULT line), then runs SCRIPT line by line: each must exit 0, a line that
starts with "! " must fail. Blank lines and lines starting with # are skipped. Then powers the
guest off. Everything received is written to LOG; exit status 0 when every line did as it
should, else the last line on stderr says which did not."""
import argparse

from serial_console import Console

ap = argparse.ArgumentParser()
ap.add_argument("sock_path")
ap.add_argument("log_path")
ap.add_argument("script")
ap.add_argument("--after-result", action="store_true")
args = ap.parse_args()
con = Console(args.sock_path, args.log_path, "serial_shell")

if args.after_result:
    # Up to the end of the line: a read can end in the middle of a word ("o" of "ok").
    m = con.search(r"BMR-RESULT: (\S+)[^\n]*\n", 900)
    if not m:
        con.fail("no BMR-RESULT line")
    if m.group(1) != b"ok":
        con.fail("the restore failed: see " + args.log_path)
con.wait("Press Enter for a shell on this console", 600)
con.send("\r")
for n, line in enumerate(open(args.script), 1):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    must_fail = line.startswith("! ")
    cmd = line[2:] if must_fail else line
    # The marker is split in the command so that its echo never matches; a newline, not ";",
    # separates it so that a line may end in "&".
    con.send(f"{cmd}\recho BMR-RC''=$?\r")
    m = con.search(r"BMR-RC=(\d+)\n", 900)
    if not m:
        con.fail(f"line {n} did not finish: {cmd}")
    rc = int(m.group(1))
    if must_fail and rc == 0:
        con.fail(f"line {n} should have failed but did not: {cmd}")
    if not must_fail and rc != 0:
        con.fail(f"line {n} failed (exit status {rc}): {cmd}")
con.send("sync; poweroff -f\r")
con.until_closed()
