"""What the inference service needs of its broker link: the part of shared.mqtt.MqttLink it calls.

The service is handed its link (as Roboflow's InferencePipeline is handed its sinks) instead of
building one, so the real MqttLink serves in production and a small in-memory link in the fast tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import paho.mqtt.client as paho

Handler = Callable[[paho.MQTTMessage], None]


class Sent(Protocol):
    """What a publish returns (paho's MQTTMessageInfo): its rc says whether the client took it."""

    @property
    def rc(self) -> int: ...


class Link(Protocol):
    """A broker link: shared.mqtt.MqttLink, or a stand-in with the same calls."""

    connected: threading.Event  # set while the broker is connected (the health check reads it)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Delivers every message matching `topic_filter` to `handler`, from now on and after reconnects."""

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> bool:
        """Stops a subscription; True once the broker confirmed it, so nothing more arrives for it."""

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                content_type: str | None = None) -> Sent:
        """Sends a message (or, at QoS 1, queues it for the reconnect); never blocks on the network."""

    def start(self) -> None:
        """Connects in the background."""

    def stop(self, final_status: bytes | None = None, timeout: float = 5.0) -> None:
        """Publishes the final retained status, flushes, disconnects."""
