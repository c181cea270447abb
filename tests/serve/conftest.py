import pytest

from live import LiveServer


@pytest.fixture
def live_server():
    """live_server(app) -> LiveServer; every server started is shut down after the test."""
    started = []

    def start(app):
        started.append(LiveServer(app))
        return started[-1]

    yield start
    for s in started:
        s.close()
