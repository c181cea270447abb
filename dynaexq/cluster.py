"""Connecting to a Ray cluster (`prepare --ray`, `serve --ray`): one place for the errors a user can fix."""
from __future__ import annotations

from dynaexq.errors import UserError


def connect(address: str | None, flag: str = "--ray"):
    """-> the `ray` module, connected to the cluster at `address` (None: a local cluster of this machine's CPUs,
    started here and stopped with this process)."""
    try:
        import ray
    except ImportError:
        raise UserError(f"{flag} needs Ray: pip install 'dynaexq[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as err:
            raise UserError(f"{flag} {address}: no Ray cluster answers there ({err}); start one with `ray start "
                            "--head` or give no address for a local one") from None
        except ray.exceptions.AuthenticationError:
            raise UserError(f"{flag} {address}: the cluster wants token authentication; set RAY_AUTH_MODE=token (the "
                            "token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN, as for any Ray driver)") from None
    return ray
