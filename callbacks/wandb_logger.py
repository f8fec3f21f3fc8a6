"""A WandbLogger that goes offline by itself and never lets W&B stop a run."""

from __future__ import annotations

import netrc
import os
import socket
import warnings
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger


def wandb_reachable(timeout: float = 2.0) -> bool:
    """True when an API key is configured and the W&B host answers a TCP connection."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if not has_key:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class AutoOfflineWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline when there is no API key or no network.

    Offline runs are written under ``save_dir/wandb/offline-run-*`` and can be uploaded later
    with ``wandb sync``. If even an online ``wandb.init`` fails, the run continues offline.

    Args:
        offline: force offline (True) or online (False); None decides automatically.
        **kwargs: everything ``WandbLogger`` takes (project, name, save_dir, version, ...).
    """

    def __init__(self, offline: bool | None = None, **kwargs):
        if offline is None:
            offline = not wandb_reachable()
        if offline:
            kwargs["log_model"] = False  # W&B cannot upload checkpoints from an offline run
        super().__init__(offline=offline, **kwargs)

    @property
    def experiment(self):
        try:
            return super().experiment
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            if self._offline:
                raise
            warnings.warn(f"W&B could not start online ({err}); logging offline instead", stacklevel=2)
            self._offline, self._log_model = True, False
            self._wandb_init["mode"] = "offline"
            return super().experiment
