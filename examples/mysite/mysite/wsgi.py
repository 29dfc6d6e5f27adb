"""WSGI entry point (gunicorn mysite.wsgi:application): the HTTP half of the two-server
layout; WebSockets go to daphne on the Unix socket (mysite.asgi)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = get_wsgi_application()
