"""A static file server for the tests that can misbehave like a bad network: with --drop N,
every Nth chunk download is cut off halfway through its body. --slow BYTES SECS sends chunk
bodies BYTES at a time, one piece every SECS (a thin but working link); --stall sends half of
each chunk body and then nothing (a server that hangs). --chunk-delay S waits S seconds before
each chunk download and --served FILE gets a line for each one served (a slow link that a test
can interrupt at a known point). --tls CERT KEY serves HTTPS; --posts DIR stores each POST body
there (rescue reports)."""
import argparse
import functools
import http.server
import os
import ssl
import threading
import time

counter = 0
lock = threading.Lock()


class Handler(http.server.SimpleHTTPRequestHandler):
    drop_every = 0
    slow = None
    stall = False
    chunk_delay = 0.0
    served = None

    def log_message(self, *args):
        pass

    posts = None

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.posts:
            with lock:
                n = len(os.listdir(self.posts))
            with open(os.path.join(self.posts, f"{n}.json"), "wb") as f:
                f.write(body)
        self.send_response(204)
        self.end_headers()

    def copyfile(self, source, outputfile):
        global counter
        chunk_get = "/chunks/" in self.path and self.command == "GET"
        if chunk_get:
            time.sleep(self.chunk_delay)
            if self.served:
                with lock, open(self.served, "a") as f:
                    f.write(self.path + "\n")
        if chunk_get and self.slow:
            piece, secs = self.slow
            while data := source.read(piece):
                outputfile.write(data)
                outputfile.flush()
                time.sleep(secs)
            return
        if chunk_get and self.stall:
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            outputfile.flush()
            time.sleep(3600)
            return
        if self.drop_every and "/chunks/" in self.path and self.command == "GET":
            with lock:
                counter += 1
                n = counter
            if n % self.drop_every == 0:
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
        super().copyfile(source, outputfile)


p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--port-file", required=True)
p.add_argument("--drop", type=int, default=0)
p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
p.add_argument("--posts")
p.add_argument("--port", type=int, default=0)
p.add_argument("--slow", nargs=2, type=float, metavar=("BYTES", "SECS"))
p.add_argument("--stall", action="store_true")
p.add_argument("--chunk-delay", type=float, default=0.0)
p.add_argument("--served")
a = p.parse_args()
Handler.chunk_delay = a.chunk_delay
Handler.served = a.served
Handler.drop_every = a.drop
Handler.slow = (int(a.slow[0]), a.slow[1]) if a.slow else None
Handler.stall = a.stall
Handler.posts = a.posts
srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), functools.partial(Handler, directory=a.dir))
if a.tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.tls[0], a.tls[1])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
with open(a.port_file, "w") as f:
    f.write(str(srv.server_address[1]))
srv.serve_forever()
