# Repo root on sys.path for tests (models, data, engine import as top-level packages).


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds a DeepSpeed C++ op on first run (~1 min); deselect with -m 'not slow'")
