"""Turn a repository made by a real `bmr backup` into a hostile one, as a damaged disk or a
forger could (tests/hostile_repo.rs). Every change keeps the manifest's checksums right, so
bmr gets past them to the part under test.

  chunk-bomb REPO HOST [--no-size]  the first data chunk of the snapshot becomes a zstd frame
                                    of 3 GiB of zeroes (declared, or with no declared size)
  toc-bomb REPO HOST                the file list gets an entry whose path is 2 GiB long
  toc-digest REPO HOST PATH         the file list entry PATH names a 31-byte chunk digest
"""
import glob
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading

SKIPPABLE = struct.pack("<II", 0x184D2A5B, 40) + b"BMRC" + struct.pack("<I", 1)


def zstd_compress(data, extra=()):
    return subprocess.run(["zstd", "-q", "-c", *extra], input=data, stdout=subprocess.PIPE, check=True).stdout


def zstd_decompress(data):
    return subprocess.run(["zstd", "-q", "-d", "-c"], input=data, stdout=subprocess.PIPE, check=True).stdout


def snapshot(repo, host):
    [m] = [p for p in glob.glob(f"{repo}/hosts/{host}/snapshots/*.json")]
    return m, json.load(open(m))


def save_manifest(path, m):
    with open(path, "w") as f:
        json.dump(m, f, indent=2)


def rewrite(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest(), len(data)


# --- CBOR, as much of it as bmr's file lists use --------------------------------------------


def cbor_head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    for ai, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | ai]) + struct.pack(fmt, n)


def cbor_enc(v):
    if v is None:
        return b"\xf6"
    if v is True or v is False:
        return b"\xf5" if v else b"\xf4"
    if isinstance(v, int):
        return cbor_head(0, v) if v >= 0 else cbor_head(1, -1 - v)
    if isinstance(v, bytes):
        return cbor_head(2, len(v)) + v
    if isinstance(v, str):
        b = v.encode()
        return cbor_head(3, len(b)) + b
    if isinstance(v, list):
        return cbor_head(4, len(v)) + b"".join(cbor_enc(x) for x in v)
    if isinstance(v, dict):
        return cbor_head(5, len(v)) + b"".join(cbor_enc(k) + cbor_enc(x) for k, x in v.items())
    raise TypeError(v)


def cbor_dec(b, i):
    ib = b[i]
    major, ai = ib >> 5, ib & 31
    i += 1
    if major == 7:
        return {20: False, 21: True, 22: None}[ai], i
    if ai < 24:
        n = ai
    else:
        size = {24: 1, 25: 2, 26: 4, 27: 8}[ai]
        n = int.from_bytes(b[i : i + size], "big")
        i += size
    if major == 0:
        return n, i
    if major == 1:
        return -1 - n, i
    if major == 2:
        return bytes(b[i : i + n]), i + n
    if major == 3:
        return b[i : i + n].decode(), i + n
    if major == 4:
        out = []
        for _ in range(n):
            x, i = cbor_dec(b, i)
            out.append(x)
        return out, i
    if major == 5:
        out = {}
        for _ in range(n):
            k, i = cbor_dec(b, i)
            out[k], i = cbor_dec(b, i)
        return out, i
    raise ValueError(f"CBOR major type {major}")


def toc_entries(plain):
    out, i = [], 0
    while i < len(plain):
        e, i = cbor_dec(plain, i)
        out.append(e)
    return out


# --- the alterations --------------------------------------------------------------------------


def chunk_bomb(repo, host, no_size):
    size = 3 << 30
    args = ["-1", "--no-content-size"] if no_size else ["-1", f"--stream-size={size}"]
    zst = subprocess.Popen(["zstd", "-q", "-c", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = []
    t = threading.Thread(target=lambda: out.append(zst.stdout.read()))
    t.start()
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        zst.stdin.write(block)
    zst.stdin.close()
    t.join()
    zst.wait()
    payload = out[0]
    sha = hashlib.sha256(payload).digest()
    stored = SKIPPABLE + sha + payload
    mpath, m = snapshot(repo, host)
    idx_path = os.path.join(os.path.dirname(mpath), m["index"]["file"])
    plain = bytearray(zstd_decompress(open(idx_path, "rb").read()))
    # Every data chunk becomes the bomb; the index records its stored size and hash, so only
    # decompressing can tell.
    i = 8
    while True:
        area, off, ln, kind = struct.unpack_from("<IQIB", plain, i)
        j = i + 17
        if kind == 0xFF:
            break
        if kind == 1:
            digest = bytes(plain[j : j + 32])
            rewrite(f"{repo}/chunks/{digest[:1].hex()}/{digest.hex()}", stored)
            struct.pack_into("<I", plain, j + 32, len(stored))
            plain[j + 36 : j + 68] = sha
            j += 68
        (nr,) = struct.unpack_from("<I", plain, j)
        i = j + 4 + 8 * nr
    m["index"]["sha256"], m["index"]["len"] = rewrite(idx_path, zstd_compress(bytes(plain)))
    save_manifest(mpath, m)


def toc_file(repo, host):
    mpath, m = snapshot(repo, host)
    t = max(m["tocs"], key=lambda t: t["len"])
    return mpath, m, t, os.path.join(os.path.dirname(mpath), t["file"])


def toc_bomb(repo, host):
    mpath, m, t, path = toc_file(repo, host)
    plain = zstd_decompress(open(path, "rb").read())
    root, end = cbor_dec(plain, 0)
    size = 2 << 30
    zst = subprocess.Popen(["zstd", "-q", "-1", "-c"], stdin=subprocess.PIPE, stdout=open(path, "wb"))
    zst.stdin.write(plain[:end])
    # An entry {"path": <2 GiB of 'a'>, ...}: a path field, so a decoder wants all of it.
    zst.stdin.write(b"\xa1" + cbor_enc("path") + cbor_head(2, size))
    block = b"a" * (1 << 20)
    for _ in range(size >> 20):
        zst.stdin.write(block)
    zst.stdin.close()
    zst.wait()
    data = open(path, "rb").read()
    t["sha256"], t["len"] = hashlib.sha256(data).hexdigest(), len(data)
    save_manifest(mpath, m)


def toc_digest(repo, host, target):
    mpath, m, t, path = toc_file(repo, host)
    entries = toc_entries(zstd_decompress(open(path, "rb").read()))
    [e] = [e for e in entries if e["path"] == target.encode()]
    e["data"] = {"chunks": [[b"\x07" * 31, e["size"]]]}
    t["sha256"], t["len"] = rewrite(path, zstd_compress(b"".join(cbor_enc(x) for x in entries)))
    save_manifest(mpath, m)
    print(entries.index(e))


cmd, repo, host, *rest = sys.argv[1:]
if cmd == "chunk-bomb":
    chunk_bomb(repo, host, "--no-size" in rest)
elif cmd == "toc-bomb":
    toc_bomb(repo, host)
elif cmd == "toc-digest":
    toc_digest(repo, host, rest[0])
else:
    sys.exit(f"unknown command {cmd}")
