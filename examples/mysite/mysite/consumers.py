"""A WebSocket route whose messages go through the channel layer (Redis): every text a
client sends is broadcast with group_send to all connections in the group."""
import json

from channels.generic.websocket import AsyncWebsocketConsumer

GROUP = "broadcast"


class BroadcastConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        await self.channel_layer.group_send(GROUP, {"type": "broadcast.message", "text": text_data})

    async def broadcast_message(self, event):
        await self.send(
            text_data=json.dumps(
                {"text": event["text"], "channel_layer": type(self.channel_layer).__name__}
            )
        )
