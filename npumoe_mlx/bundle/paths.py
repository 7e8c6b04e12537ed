"""Where npumoe keeps what it can rebuild: one cache root for every kind of file.

``$NPUMOE_CACHE`` when set and not empty, else ``~/.cache/npumoe`` on every platform (as
Hugging Face's ``~/.cache/huggingface``). Under it: ``bundles/`` (bundles of hub models and
read-only model folders), ``coreml/`` (compiled Core ML programs) and ``demo/``.
"""

import os
from pathlib import Path

CACHE_ENV = "NPUMOE_CACHE"


def cache_root() -> Path:
    """The cache folder (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "npumoe")
