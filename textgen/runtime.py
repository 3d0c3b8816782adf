"""Process-wide CPU settings for torch, applied once per worker."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def configure_torch(threads: int) -> None:
    """Intra-op threads as configured, one inter-op thread, no tokenizer thread pool."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)
    try:
        # Allowed once per process and only before any parallel work; a second app in the
        # same process (tests) keeps the first value.
        torch.set_num_interop_threads(1)
    except RuntimeError:
        log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())
