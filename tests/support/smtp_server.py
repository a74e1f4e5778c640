#!/usr/bin/python3
"""Test SMTP server for the Outpost test suite (aiosmtpd, Debian's python3-aiosmtpd).

Run with /usr/bin/python3. Every accepted message is written into --maildir as
NNNNN.eml (raw DATA bytes) plus NNNNN.json ({"from", "to", "auth_user", "eml"});
the .json file is renamed into place last, so its presence means the message
is complete. Prints "READY <port>" once listening; exits when stdin is closed
(so it never outlives the test process) or on SIGTERM.
"""

import argparse
import json
import os
import signal
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class FileHandler:
    def __init__(self, maildir):
        self.maildir = maildir
        self.lock = threading.Lock()
        existing = [f for f in os.listdir(maildir) if f.endswith(".json")]
        self.counter = len(existing)

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.counter += 1
            n = self.counter
        stem = os.path.join(self.maildir, "%05d" % n)
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(stem + ".eml", "wb") as f:
            f.write(data)
        auth_user = None
        auth = getattr(session, "auth_data", None)
        if isinstance(auth, LoginPassword):
            auth_user = auth.login.decode("utf-8", "replace")
        meta = {
            "from": envelope.mail_from,
            "to": list(envelope.rcpt_tos),
            "auth_user": auth_user,
            "eml": os.path.basename(stem + ".eml"),
        }
        with open(stem + ".json.tmp", "w") as f:
            json.dump(meta, f)
        os.replace(stem + ".json.tmp", stem + ".json")
        return "250 Message accepted for delivery"


def make_authenticator(user, password):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    return authenticator


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--auth-require-tls", action="store_true")
    p.add_argument("--auth-optional", action="store_true",
                   help="advertise AUTH but accept unauthenticated mail too")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--require-starttls", action="store_true")
    p.add_argument("--implicit-tls", action="store_true")
    a = p.parse_args()

    kwargs = {}
    tls = None
    if a.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(a.cert, a.key)
    if a.implicit_tls:
        kwargs["ssl_context"] = tls
    elif tls is not None:
        kwargs["tls_context"] = tls
        kwargs["require_starttls"] = a.require_starttls
    if a.user is not None:
        kwargs["authenticator"] = make_authenticator(a.user, a.password or "")
        kwargs["auth_required"] = not a.auth_optional
        kwargs["auth_require_tls"] = a.auth_require_tls
    else:
        kwargs["auth_require_tls"] = False

    controller = Controller(
        FileHandler(a.maildir),
        hostname="127.0.0.1",
        port=a.port,
        server_hostname="outpost-test-smtp",
        **kwargs,
    )
    try:
        controller.start()
    except Exception as e:  # port collision etc.
        print("START FAILED: %r" % (e,), flush=True)
        sys.exit(3)
    print("READY %d" % a.port, flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_stdin():
        try:
            sys.stdin.read()
        finally:
            stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass
    controller.stop()


if __name__ == "__main__":
    main()
