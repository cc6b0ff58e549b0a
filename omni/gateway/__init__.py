"""The network edge: HTTP and WebSocket endpoints in front of realtime sessions."""

from omni.gateway.app import create_app
from omni.gateway.serve import run_server
from omni.gateway.state import EngineFactory

__all__ = ["EngineFactory", "create_app", "run_server"]
