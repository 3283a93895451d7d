"""Admin API resources: one module per group, each a function returning its ``Endpoint`` list.

Dependencies are explicit arguments (the operator state, the registry, the certificate
manager, counters); nothing is read from globals or configuration inside a handler.
"""
