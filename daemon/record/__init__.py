"""What happened, kept: the event store (``events``), the journal (``journal``), the hooks
(``hooks``) and the daemon's logging setup (``logs``)."""
