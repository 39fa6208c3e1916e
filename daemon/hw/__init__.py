"""The hardware seams: the only modules that talk to the GPU driver (``nvml``, the only pynvml
import) and to the kernel's ethtool netlink family (``netlink``, the only pyroute2 import)."""
