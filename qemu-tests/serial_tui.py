"""Drive bmr's TUI over a QEMU serial console (a unix socket): pick the URL entry, type the
repository URL, take the newest point of the host, the first disk, answer the grow question,
confirm by typing the disk's name, wait for the restore, then choose "Power off". Everything
received is written to LOG.

usage: serial_tui.py SOCKET REPO_URL LOG [--host NAME] [--target vda] [--grow]"""
import argparse
import sys

from serial_console import Console

ap = argparse.ArgumentParser()
ap.add_argument("sock_path")
ap.add_argument("url")
ap.add_argument("log_path")
ap.add_argument("--host", default="sample")
ap.add_argument("--target", default="vda")
ap.add_argument("--grow", action="store_true")
args = ap.parse_args()
con = Console(args.sock_path, args.log_path, "serial_tui")
wait, send, seen = con.wait, con.send, con.seen
url = args.url

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
con.until_closed()
