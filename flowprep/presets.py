"""Flow parameters by name: the presets every flow implementation reads (OpenCV, the fused CPU
TV-L1, the torch TV-L1), kept apart from the implementations so none of them imports another.

Parameters use the snake_case names of flowprep/tvl1_torch.py, so one preset dict drives every
TV-L1 implementation.
"""
from __future__ import annotations

# OpenCV's DualTVL1 defaults: the settings denseflow (and so most published two-stream numbers) use.
ACCURATE = dict(
    tau=0.25, lambda_=0.15, theta=0.3, nscales=5, warps=5, epsilon=0.01,
    inner_iterations=30, outer_iterations=10, scale_step=0.8, median_filtering=5,
)
TVL1_PRESETS: dict[str, dict] = {
    "accurate": dict(ACCURATE),
    # A coarser pyramid (3 levels, halving) with 2 warps x 1 outer x 10 inner iterations: measured
    # about 8x faster than `accurate` on 340x256 footage, 0.05 px mean error on a known smooth motion
    # and about 0.4 px mean difference from `accurate` on real footage (benchmarks/extract_bench.py).
    "fast": dict(ACCURATE, nscales=3, scale_step=0.5, warps=2, inner_iterations=10, outer_iterations=1),
}
# Farneback: OpenCV's sample settings (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags).
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
# Dense Lucas-Kanade (cv2.optflow.calcOpticalFlowSparseToDense): OpenCV's defaults.
LK = dict(grid_step=8, k=128, sigma=0.05, use_post_proc=True, fgs_lambda=500.0, fgs_sigma=1.5)
# DIS: OpenCV's own presets, by name; what each sets is read back from OpenCV when it is used.
DIS_PRESETS = ("ultrafast", "fast", "medium")
