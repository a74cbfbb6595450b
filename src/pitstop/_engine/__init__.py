"""Engine layer: writing a checkpoint (hash, deduplicate, pack, write in parallel), reading
and verifying one, the async snapshot and the background writer thread.
"""
