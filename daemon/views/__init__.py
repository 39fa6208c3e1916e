"""What the snapshot looks like from outside: the Prometheus exposition (``metrics*``), the HTTP
server (``httpserver``), the status socket (``statusapi``) and the status text (``statusview``).
Views read snapshots; they never touch hardware or call a probe."""
