"""Format layer: the on-disk format without IO -- manifest names, the dtype whitelist, and
the manifest itself (encode, and the validating decoder of hostile input). See
``docs/format.md``.
"""
