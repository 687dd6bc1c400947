"""``tuneloop ui``: a local web app over the workspace (runs, gates, data, registry, rollouts, feedback and drift,
starting a run), in English and Chinese.

Modules: ``app.py`` (:func:`~tuneloop.ui.app.create_app`, the routes and the auth rules), ``views.py`` (what each
panel shows, from the workspace and the registry API), ``launch.py`` (start a run: configs, override checks, the
subprocess), ``server.py`` (:func:`~tuneloop.ui.server.serve_ui`, what the command runs). The page is
``static/index.html`` + ``app.js`` + ``app.css``, its strings in ``static/i18n/<lang>.json``, Chart.js vendored in
``static/vendor/`` (pinned, hashes in ``vendor/SHA256SUMS``; ``scripts/vendor_ui_assets.sh`` re-fetches them).
"""
