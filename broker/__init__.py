"""The ndpipe broker: queues, dispatch by credit, heartbeats and requeue (see PROTOCOL.md)."""

from ndpipe.broker.server import Broker, serve
from ndpipe.broker.state import BrokerState

__all__ = ["Broker", "BrokerState", "serve"]
