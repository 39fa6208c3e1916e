"""Health as NVIDIA judges it: the rules (``judge``), their state across restarts (``state``),
the Xid catalog (``xid``, ``xid_catalog.toml``) and the host prerequisite checks (``checks``)."""
