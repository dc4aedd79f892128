"""The web dashboard's files (static/: hand-written HTML, CSS and JavaScript, and vendored uPlot and Swagger UI from
the npm registry, each with its licence). They ship with the package and are served by app/api/routes/dashboard.py;
nothing is fetched from elsewhere at run time."""

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
