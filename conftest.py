# Repo root on sys.path for tests (models, data, engine import as top-level packages).
