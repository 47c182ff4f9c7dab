#!/usr/bin/env python3
"""The ceiling for bench.py: what this stack (Bottle under waitress, stock
4 threads, the waitress limits spp_server.py sets) can do when a postback
costs nothing but reading the body and parsing its JSON.  Stores nothing.

    python bench/ceiling.py --port 8081 --threads 4
"""

import argparse
import json
import logging
import sys

from bottle import Bottle, HTTPResponse, request


def create_app():
    app = Bottle()

    def postback():
        body = request.environ["wsgi.input"].read(int(request.environ.get("CONTENT_LENGTH") or 0))
        try:
            payload = json.loads(body)
        except ValueError:
            raise HTTPResponse('{"error": "the body is not valid JSON"}', status=400)
        if not isinstance(payload, dict):
            raise HTTPResponse('{"error": "the body must be a JSON object"}', status=400)
        return {"status": "recorded"}

    app.route("/postback", "POST", postback)
    app.route("/healthz", "GET", lambda: {"status": "ok"})
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--switch-interval", type=float,
                        help="sys.setswitchinterval() in seconds (bench/steps.py); default Python's")
    args = parser.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as spp_server does

    from waitress import serve

    # The settings of spp_server.waitress_settings() that bear on speed.
    serve(
        create_app(),
        host=args.host,
        port=args.port,
        threads=args.threads,
        connection_limit=100,
        channel_timeout=30,
        cleanup_interval=5,
        max_request_header_size=16 * 1024,
        max_request_body_size=128 * 1024,
        asyncore_use_poll=True,
        expose_tracebacks=False,
        ident="spp-ceiling",
    )


if __name__ == "__main__":
    main()
