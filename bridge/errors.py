"""The bridge's exception base; library errors are converted to these at the edge."""


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class StoreError(BridgeError):
    """The database refused or failed an operation."""


class BrokerError(BridgeError):
    """The MQTT broker could not be reached or refused us."""
