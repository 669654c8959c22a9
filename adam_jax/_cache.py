"""An opt-in switch for JAX's persistent compilation cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax


def enable_compilation_cache(
    path: str | os.PathLike[str], *, min_compile_time_secs: float = 1.0
) -> None:
    """Keep compiled programs in ``path``, so a new process reuses them.

    Turns on JAX's own persistent compilation cache: it sets
    ``jax_compilation_cache_dir`` to ``path`` and
    ``jax_persistent_cache_min_compile_time_secs`` to ``min_compile_time_secs``
    (programs that compiled faster are not written), and nothing else. It is
    the same as those two ``jax.config.update`` calls; adam_jax never sets them
    on its own. Call it once, right after the imports, before anything is
    compiled: JAX reads the setting at its first compile.

    A restarted notebook or a script run again then loads ``fit``'s compiled
    loop from disk instead of compiling it (the first call still traces and
    lowers the program to find it). The cache is keyed on the program, the
    JAX version and the device, so a stale entry is never used; delete the
    directory to reclaim its space.

    Args:
      path: a directory (``~`` is expanded), created if missing.
      min_compile_time_secs: only programs whose compile took at least this
        long are written (JAX's default is 1.0).

    Example:
      At the top of a notebook or script (here undone at the end, as the
      two settings are global):

      >>> import tempfile, jax, adam_jax
      >>> before = (jax.config.jax_compilation_cache_dir,
      ...           jax.config.jax_persistent_cache_min_compile_time_secs)
      >>> adam_jax.enable_compilation_cache(tempfile.mkdtemp(), min_compile_time_secs=0.5)
      >>> print(jax.config.jax_persistent_cache_min_compile_time_secs)
      0.5
      >>> jax.config.update("jax_compilation_cache_dir", before[0])
      >>> jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    """
    if isinstance(min_compile_time_secs, bool) or not isinstance(
        min_compile_time_secs, int | float
    ):
        raise TypeError(
            "min_compile_time_secs must be a number of seconds, "
            f"got min_compile_time_secs={min_compile_time_secs!r}"
        )
    if not min_compile_time_secs >= 0:
        raise ValueError(
            f"min_compile_time_secs must be >= 0, got min_compile_time_secs={min_compile_time_secs}"
        )
    path = os.path.expanduser(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    update: Callable[[str, Any], None] = jax.config.update  # untyped in jax's stubs
    update("jax_compilation_cache_dir", path)
    update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
