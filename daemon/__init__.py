"""gpucostd. This module is imported by every command, the light client ones included, so
it holds only what they all agree on and imports nothing but os: the version and the default
paths (gpucostd.config re-exports them)."""
import os

__version__ = "0.2.0"

DEFAULT_PATH = "/etc/gpucostd/gpucostd.toml"
DEFAULT_SOCKET = "/run/gpucostd/gpucostd.sock"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def user_runtime_dir() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/gpucostd-{os.getuid()}"


def default_socket_path() -> str:
    if is_root():
        return DEFAULT_SOCKET
    return os.path.join(user_runtime_dir(), "gpucostd", "gpucostd.sock")
