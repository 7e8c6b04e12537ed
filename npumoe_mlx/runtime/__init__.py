"""A loaded model's offload: the expert seam, guard, executor, dispatch, release, dense programs,
the installer, offload modes, loading and sharded loading."""
