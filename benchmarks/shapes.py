"""The one shape set of the benchmarks (CPU and GPU).

Each entry: (name, shape, num_groups). Layout, dtype, direction and epilogue are swept by
the benchmark scripts over these shapes.
"""

# CPU benchmark (issue "A CPU path faster than PyTorch's own GroupNorm")
CPU_SHAPES = [
    ("sd-unet-64", (1, 320, 64, 64), 32),
    ("resnet-56", (8, 256, 56, 56), 32),
    ("cifar-32", (32, 64, 32, 32), 32),
    ("unet3d-32", (2, 32, 32, 32, 32), 8),
    ("sd-unet-16", (2, 1280, 16, 16), 32),
    ("big-128", (4, 512, 128, 128), 32),
]

# GPU benchmark (issue "Triton CUDA kernels at the memory-bandwidth limit"): the CPU set plus
# the shapes that stress the GPU design points (launch-bound, C/G=60, huge, tiny groups, 3D).
GPU_SHAPES = CPU_SHAPES + [
    ("sd-unet-320", (2, 320, 64, 64), 32),
    ("sd-unet-8", (2, 1280, 8, 8), 32),
    ("sdxl-1920", (2, 1920, 32, 32), 32),
    ("vae-256", (1, 256, 1024, 1024), 32),
    ("vae-512", (1, 512, 512, 512), 32),
    ("resnet50-gn-56", (32, 256, 56, 56), 32),
    ("resnet50-gn-7", (32, 2048, 7, 7), 32),
    ("maskrcnn-head", (512, 256, 7, 7), 32),
    ("unet3d-128", (2, 32, 128, 128, 128), 8),
    ("liger-1d", (128, 2048, 512), 512),
]

# Per-call overhead (bench_cpu.py --overhead): small tensors, where the Python/dispatch cost
# of a call is comparable to the kernel's
OVERHEAD_SHAPES = [
    ("tiny", (2, 32, 8, 8), 8),
    ("small", (8, 64, 16, 16), 32),
]
