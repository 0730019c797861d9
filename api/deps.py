"""Request-scoped access to the running bridge."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from bridge.service import BridgeService


def get_bridge(conn: HTTPConnection) -> BridgeService:
    """Return the bridge the app's lifespan started."""
    service: BridgeService = conn.app.state.bridge
    return service


BridgeDep = Annotated[BridgeService, Depends(get_bridge)]

__all__ = ["BridgeDep", "Request", "get_bridge"]
