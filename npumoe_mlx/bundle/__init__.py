"""The on-disk bundle (``npumoe_mlx.bundle.bundle``: manifest, plan, lookup) and file safety:
fingerprints, atomic writes, the build lock, owned folders, model checks, schema."""
