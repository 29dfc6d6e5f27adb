"""A minimal real Django app for tests/django.rs: the settings a Django project uses
behind Gatehouse, and two views that expose what Django concludes about each request.

Prints the port it listens on (an OS-chosen free port), then serves forever.
"""
import sys

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="throw-away-test-key",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["localhost"],
    # The one line Gatehouse needs: trust X-Forwarded-Proto from the gateway.
    SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"),
    CSRF_COOKIE_SECURE=True,
    MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
    INSTALLED_APPS=[],
)

import django  # noqa: E402

django.setup()

from django.http import JsonResponse  # noqa: E402
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


urlpatterns = [path("form/", form), path("submit/", submit)]

if __name__ == "__main__":
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from django.core.wsgi import get_wsgi_application

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, get_wsgi_application(), handler_class=QuietHandler)
    print(server.server_port, flush=True)
    sys.stdout.flush()
    server.serve_forever()
