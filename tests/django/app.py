"""A minimal real Django app for tests/django.rs: the settings a Django project uses
behind Gatehouse, and two views that expose what Django concludes about each request.

Prints the port it listens on (an OS-chosen free port), then serves forever.

tests/django.rs's `check --probe` tests misconfigure it through environment variables:
DJANGO_ALLOWED_HOSTS (comma-separated, default "localhost"), DJANGO_PROXY_SSL_HEADER=off
(no SECURE_PROXY_SSL_HEADER), DJANGO_SSL_REDIRECT=on (SECURE_SSL_REDIRECT = True),
DJANGO_CSRF_TRUSTED_ORIGINS (comma-separated), DJANGO_WS_ALLOWED_HOSTS (the hosts the
emulated WebSocket origin check accepts; default ALLOWED_HOSTS).

Run as a script (wsgiref), /ws/... emulates a Channels WebSocket route behind
`AllowedHostsOriginValidator`: a handshake whose Origin host is not allowed gets 403, any
other gets 101 (and the connection is closed; no frames are spoken). Under Gunicorn
(`app:application`) it is the HTTP half of the Channels layout whose WebSocket half is
channels_asgi.py under Daphne.
"""
import base64
import hashlib
import os
import sys
from urllib.parse import urlsplit

from django.conf import settings


def env_list(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    return [item for item in value.split(",") if item]


ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost"])
WS_ALLOWED_HOSTS = env_list("DJANGO_WS_ALLOWED_HOSTS", ALLOWED_HOSTS)
# The one line Gatehouse needs: trust X-Forwarded-Proto from the gateway.
PROXY_SSL_HEADER = (
    None
    if os.environ.get("DJANGO_PROXY_SSL_HEADER") == "off"
    else ("HTTP_X_FORWARDED_PROTO", "https")
)

settings.configure(
    DEBUG=False,
    SECRET_KEY="throw-away-test-key",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=ALLOWED_HOSTS,
    SECURE_PROXY_SSL_HEADER=PROXY_SSL_HEADER,
    SECURE_SSL_REDIRECT=os.environ.get("DJANGO_SSL_REDIRECT") == "on",
    CSRF_TRUSTED_ORIGINS=env_list("DJANGO_CSRF_TRUSTED_ORIGINS", []),
    CSRF_COOKIE_SECURE=True,
    # A typical project's order: SecurityMiddleware (SSL redirect) and CommonMiddleware
    # (which validates the Host on every request) before CSRF.
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
    ],
    INSTALLED_APPS=[],
)

import django  # noqa: E402

django.setup()

from django.http import HttpResponseBadRequest, JsonResponse  # noqa: E402
from django.middleware.csrf import get_token  # noqa: E402
from django.urls import path  # noqa: E402


def describe(request):
    return {
        "is_secure": request.is_secure(),
        "host": request.get_host(),
        "absolute_uri": request.build_absolute_uri(),
        "x_real_ip": request.META.get("HTTP_X_REAL_IP"),
        "x_forwarded_for": request.META.get("HTTP_X_FORWARDED_FOR"),
    }


def form(request):
    return JsonResponse({**describe(request), "csrf_token": get_token(request)})


def submit(request):
    # Reaching this view means CsrfViewMiddleware accepted the POST.
    return JsonResponse({**describe(request), "value": request.POST.get("value")})


def index(request):
    return JsonResponse(describe(request))


def bad(request):
    # A view that refuses requests itself (a missing parameter), whatever the Host.
    return HttpResponseBadRequest("missing parameter: q")


urlpatterns = [
    path("", index),
    path("form/", form),
    path("submit/", submit),
    path("bad/", bad),
]

# For Gunicorn (`gunicorn app:application`), the Channels layout's HTTP server.
from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


def websocket_handshake(handler):
    """The emulated Channels route: AllowedHostsOriginValidator, then accept."""
    from django.http.request import validate_host

    origin = handler.headers.get("Origin", "")
    host = urlsplit(origin).hostname or ""
    if not validate_host(host, WS_ALLOWED_HOSTS):
        handler.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return
    key = handler.headers.get("Sec-WebSocket-Key", "")
    accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()
    handler.wfile.write(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )

if __name__ == "__main__":
    from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, make_server

    from django.core.wsgi import get_wsgi_application

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass

        def handle(self):
            # WSGIRequestHandler.handle, with WebSocket handshakes to /ws/ answered here
            # (WSGI cannot send hop-by-hop headers such as Upgrade).
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536 or not self.parse_request():
                return
            upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
            if upgrade and self.path.startswith("/ws/"):
                websocket_handshake(self)
                return
            handler = ServerHandler(
                self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=False
            )
            handler.request_handler = self
            handler.run(self.server.get_app())

    server = make_server("127.0.0.1", 0, get_wsgi_application(), handler_class=QuietHandler)
    print(server.server_port, flush=True)
    sys.stdout.flush()
    server.serve_forever()
