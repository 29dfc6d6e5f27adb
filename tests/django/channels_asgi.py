"""The WebSocket half of the classic Django Channels layout, for tests/django.rs: the
same project as app.py (its settings and ALLOWED_HOSTS) served by Daphne, usually on a
Unix socket, while Gunicorn serves app.py's HTTP views.

`/ws/echo/` sits behind Channels' AllowedHostsOriginValidator; on connect it sends one
JSON message with what Daphne and the consumer saw (scheme, client address, forwarding
headers, Host), then echoes every text message.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import app  # noqa: E402,F401  (configures Django)
from channels.generic.websocket import WebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.urls import path  # noqa: E402


class Echo(WebsocketConsumer):
    def connect(self):
        self.accept()
        headers = {
            name.decode("latin1"): value.decode("latin1")
            for name, value in self.scope.get("headers", [])
        }
        client = self.scope.get("client")
        self.send(
            text_data=json.dumps(
                {
                    "scheme": self.scope.get("scheme"),
                    "client": client[0] if client else None,
                    "host": headers.get("host"),
                    "x_forwarded_proto": headers.get("x-forwarded-proto"),
                    "x_forwarded_for": headers.get("x-forwarded-for"),
                    "path": self.scope.get("path"),
                }
            )
        )

    def receive(self, text_data=None, bytes_data=None):
        self.send(text_data=text_data)


application = ProtocolTypeRouter(
    {
        "http": get_asgi_application(),
        "websocket": AllowedHostsOriginValidator(
            URLRouter([path("ws/echo/", Echo.as_asgi())])
        ),
    }
)
