# Django settings for an app behind Gatehouse (examples/docker-compose.yml).
# Merge into your settings.py. `gatehouse check` prints the host-specific lines too.
#
# What Gatehouse sends upstream on every request (docs/migrating-from-nginx.md):
#   Host: the client's Host, unchanged         X-Forwarded-Proto: https
#   X-Forwarded-For / X-Real-IP: the client    X-Forwarded-Host / X-Forwarded-Port
# Client-sent X-Forwarded-* headers are replaced unless the peer is in
# `[proxy] trusted_proxies`, so Django can believe these.
import os

# request.is_secure() and build_absolute_uri() say https, so Django's CSRF and
# SECURE_SSL_REDIRECT logic work behind the gateway (nginx: proxy_set_header
# X-Forwarded-Proto https). Only safe because Gatehouse always overwrites the header.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Gatehouse passes Host through unchanged, so Django needs no X-Forwarded-Host.
USE_X_FORWARDED_HOST = False

ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "example.com").split(",")

# Django 4+: POSTs over HTTPS need the scheme+host origin listed. With the public port
# 443 there is no port in the origin.
CSRF_TRUSTED_ORIGINS = [f"https://{host}" for host in ALLOWED_HOSTS]

# Cookies only over HTTPS. Gatehouse already redirects HTTP and can send HSTS
# (`tls.hsts_max_age`), so leave SECURE_SSL_REDIRECT / SECURE_HSTS_SECONDS off here
# rather than sending the header twice.
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True

# Gatehouse serves these directories (read-only volumes) at /static/ and /media/.
STATIC_URL = "/static/"
STATIC_ROOT = os.environ.get("STATIC_ROOT", "/app/staticfiles")
MEDIA_URL = "/media/"
MEDIA_ROOT = os.environ.get("MEDIA_ROOT", "/app/media")

# ASGI + Channels: WebSocket routes. Redis on the private network, ACL user "django"
# with its password from the Docker secret (examples/make-secrets.sh).
ASGI_APPLICATION = "mysite.asgi.application"


def _redis_password():
    path = os.environ.get("REDIS_PASSWORD_FILE")
    if not path:
        return None
    with open(path) as secret:
        return secret.read().strip()


_REDIS_URL = "redis://{user}:{password}@{host}:6379/1".format(
    user=os.environ.get("REDIS_USER", "django"),
    password=_redis_password() or "",
    host=os.environ.get("REDIS_HOST", "redis"),
)

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [_REDIS_URL]},
    },
}

# mysite/asgi.py: Channels checks the WebSocket Origin against ALLOWED_HOSTS, which the
# gateway does not do (it passes Origin through unchanged):
#
#   from channels.routing import ProtocolTypeRouter, URLRouter
#   from channels.security.websocket import AllowedHostsOriginValidator
#   from channels.auth import AuthMiddlewareStack
#   from django.core.asgi import get_asgi_application
#
#   django_asgi_app = get_asgi_application()
#   from myapp.routing import websocket_urlpatterns
#
#   application = ProtocolTypeRouter({
#       "http": django_asgi_app,
#       "websocket": AllowedHostsOriginValidator(
#           AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
#       ),
#   })
