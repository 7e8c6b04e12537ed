"""Model -> bundle: workloads, calibration, tuning, programs, their verification, and the build
(``npumoe_mlx.build.build``; this package re-exports nothing, so a submodule is never shadowed)."""
