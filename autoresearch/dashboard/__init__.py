"""`autoresearch dashboard`: a read-only live web page over a workspace's event log.

  views.py    pure projections of the folded state and the events into what the page shows
  source.py   the read-only side of the workspace: the log (SQLite, read-only), run logs, git diffs
  auth.py     the access token for listening beyond loopback (generated, stored hashed, outside the workspace)
  server.py   the Starlette app: JSON snapshots, server-sent events, the static page
  static/     the page itself (HTML, CSS, hand-written JS and SVG: no CDN, no network)
"""
