"""Training-state layer: turning a user's state (nested dicts of arrays, values and stateful
objects) into a flat list of arrays and a JSON tree, planning an in-place restore, the
registry of framework adapters, and the global RNG states.
"""
