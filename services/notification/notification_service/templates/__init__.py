"""Email templates: ``<kind>.txt`` (subject line, blank line, plain-text body) and an optional ``<kind>.html``.

They are ``string.Template`` texts: ``$name`` placeholders, ``$$`` for a dollar sign.
"""
