"""The simulated node: scenario files (``scenario``, ``scenarios/*.toml``) and the simulated
NVML library that pynvml loads in their place (``nvml``). Never touches hardware."""
