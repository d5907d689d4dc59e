"""Errors the engine raises. Every message is one line that names the problem and, where there is
one, the fix; entry points (CLI, server, Slicer panel) show ``str(error)`` without a traceback."""


def one_line(message: object, limit: int = 200) -> str:
    """A message (or an exception's) squeezed onto one line and cut to ``limit`` characters; an
    exception without a message is named by its type. Third-party messages (pydicom, torch, HTTP
    bodies) often span several lines."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MedSAM2Error(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class InvalidVolumeError(MedSAM2Error, ValueError):
    """The volume cannot be segmented (NaN voxels, wrong dimensionality, constant intensity...)."""


class InvalidPromptError(MedSAM2Error, ValueError):
    """A prompt is outside the volume, empty, or degenerate."""


class DeviceUnavailableError(MedSAM2Error, RuntimeError):
    """The requested compute device does not exist on this machine."""


class MemoryBudgetError(MedSAM2Error, MemoryError):
    """The volume does not fit in the memory budget."""


class ModelError(MedSAM2Error, RuntimeError):
    """A model or checkpoint cannot be found, downloaded or loaded."""


class PropagationCancelled(MedSAM2Error):
    """The caller cancelled a propagation; the previous result is unchanged."""


class SessionBusyError(MedSAM2Error):
    """The session is running a propagation (or another request): wait for it or cancel it."""
