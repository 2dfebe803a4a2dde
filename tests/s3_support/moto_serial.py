"""Run moto's S3 emulator on 127.0.0.1, one request at a time.

Why not `moto_server`: its threaded werkzeug server checks If-Match / If-None-Match
and then writes in a second step, so two racing conditional PUTs can both succeed.
That would look exactly like an idalloc bug (two daemons owning one lease). Here
every request runs behind one process-wide lock, so a conditional write is atomic.

Request bodies are read in full *before* the lock is taken and responses are
materialised *inside* it: a slow client (or the tests' stalling proxy) can then
never hold the lock while it dribbles bytes.

Usage: python moto_serial.py [--port N] [--bucket NAME]... [--two-step]
Prints "PORT <n>" on stdout once it listens (port 0 picks a free one), after the
buckets exist.
"""

import argparse
import http.client
import io
import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bucket", action="append", default=[])
    # For the store check's "unsafe" verdict: conditional updates answered right
    # one at a time but checked and written in two steps (see serial() below).
    ap.add_argument("--two-step", action="store_true")
    args = ap.parse_args()

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    # --two-step: (path, ETag checked) -> PUTs that passed that check.
    passed = {}
    passed_cv = threading.Condition()

    def serial(environ, start_response):
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        if length:
            body = stream.read(int(length))
        elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            body = stream.read()
        else:
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        if args.two_step and environ["REQUEST_METHOD"] == "PUT" and "HTTP_IF_MATCH" in environ:
            # Check the precondition with a HEAD, let go, wait, then write
            # unconditionally: what a non-atomic server does.
            expected = environ.pop("HTTP_IF_MATCH")
            head = dict(environ)
            head["REQUEST_METHOD"] = "HEAD"
            head["wsgi.input"] = io.BytesIO(b"")
            head["CONTENT_LENGTH"] = "0"
            seen = {}

            def capture(status, headers, exc_info=None):
                seen["headers"] = {k.lower(): v for k, v in headers}

            with lock:
                result = app(head, capture)
                b"".join(result)
            if seen.get("headers", {}).get("etag") != expected:
                start_response("412 Precondition Failed", [("Content-Type", "application/xml")])
                return [b"<Error><Code>PreconditionFailed</Code></Error>"]
            # Wait for a second PUT to pass the same check (a lone writer, for 2 s):
            # then every race of two or more has two winners, whatever the timing,
            # where a fixed pause loses only the races that happen to fall in it.
            key = (environ.get("PATH_INFO"), expected)
            with passed_cv:
                passed[key] = passed.get(key, 0) + 1
                passed_cv.notify_all()
                passed_cv.wait_for(lambda: passed[key] >= 2, timeout=2.0)
        with lock:
            result = app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                if hasattr(result, "close"):
                    result.close()

    server = make_server("127.0.0.1", args.port, serial, threaded=True)
    port = server.server_port

    # Serve in the background while the buckets are created over HTTP, exactly
    # as any S3 client would create them.
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for bucket in args.bucket:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("PUT", "/" + bucket, body=b"")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            sys.exit("cannot create bucket %s: %d %r" % (bucket, resp.status, body))
        conn.close()

    print("PORT %d" % port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
