"""gpucostd. This module is imported by every command, the light client ones included, so
it holds only what they all agree on and imports nothing but os: the version, the default
paths (gpucostd.config re-exports them) and wrap(), the one way people's text is wrapped (status,
check)."""
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


# Words that start a command in a message (a fix, an action): wrap() keeps the command on one
# line, so it can be copied and pasted as it is.
COMMAND_WORDS = ("sudo", "systemctl", "nvidia-smi", "nvidia-ctk", "gpucostd", "apt-get",
                 "usermod", "chmod", "modprobe", "nft", "iptables", "ufw", "firewall-cmd",
                 "journalctl", "dmesg", "dcgmi")


def wrap(text: str, width: int, initial_indent: str = "", subsequent_indent: str = ""):
    """Wrap at spaces, never inside a word (`nvidia-persistenced` stays whole) and never inside
    a command: a `backticked` span, or a run from a command word (COMMAND_WORDS) to the end of
    its clause (a word ending in ; , ) or .), stays on one line where it fits."""
    import textwrap
    glue = "\x00"
    ends = (";", ",", ")", ".")
    out, command, quoted = [], False, False
    for word in text.split(" "):
        if command and not (not quoted and word.startswith("(")):
            out[-1] += glue + word
            command = "`" not in word if quoted else not word.endswith(ends)
            continue
        out.append(word)
        quoted = word.startswith("`")
        command = word.count("`") == 1 if quoted else \
            word.lstrip("(") in COMMAND_WORDS and not word.endswith(ends)
    room = width - max(len(initial_indent), len(subsequent_indent))
    words = [w if len(w) <= room else w.replace(glue, " ") for w in out]
    lines = textwrap.wrap(" ".join(words), width, initial_indent=initial_indent,
                          subsequent_indent=subsequent_indent, break_on_hyphens=False)
    return [line.replace(glue, " ") for line in lines]
