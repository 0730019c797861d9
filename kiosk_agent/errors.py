"""The agent's exception base."""


class AgentError(Exception):
    """Base of every error the kiosk agent raises on purpose."""


class CameraError(AgentError):
    """The camera could not be opened or stopped delivering frames."""
