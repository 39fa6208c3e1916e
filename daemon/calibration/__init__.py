"""`gpucostd calibrate` in one room: ``command`` (the CLI command, through the daemon or on a
simulated node), ``session`` (the state machine the daemon's loop drives), ``maths`` (pure: plan,
measure, choose) and ``metrics`` (its Prometheus families). tests/test_layering.py gives each
module its floor: ``maths`` sits with cost, ``metrics`` with the views, the rest with the
process."""
