"""The parts of a cycle (the contract is gpucostd.part): one file per concern. The loop builds
them in order (gpucostd.loop.Daemon) and runs the list; tests/test_layering.py keeps this folder
below the loop and above the probes, tuners, health, cost and record it drives."""
