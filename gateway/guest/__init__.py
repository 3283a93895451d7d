"""The guest shim: boot, measurement, keys, encrypted env and a dstack-compatible agent.

Runs inside an app's CVM (or as the laptop simulator). See ``docs/guest.md``.
"""
