"""``fedjax dashboard``: a read-only live web page of a federation (needs the ``dashboard`` extra).

``app.create_app(client)`` is the Starlette app, ``feed`` the live data behind it, ``command`` the CLI.
See docs/dashboard.md.
"""
