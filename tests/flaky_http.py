"""A static file server for the tests that can misbehave like a bad network: with --drop N,
every Nth chunk download is cut off halfway through its body."""
import argparse
import functools
import http.server
import threading

counter = 0
lock = threading.Lock()


class Handler(http.server.SimpleHTTPRequestHandler):
    drop_every = 0

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        global counter
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
a = p.parse_args()
Handler.drop_every = a.drop
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=a.dir))
with open(a.port_file, "w") as f:
    f.write(str(srv.server_address[1]))
srv.serve_forever()
