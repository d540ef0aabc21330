"""The `mor` command: composes the role groups, importing each only when it is used.

It lives outside `mor_secure` (which must never import a role package) and is
the only code besides the demo that sees both roles.
"""
