"""fl_app: federated image classification with Flower and Keras."""

import os

# Set before TensorFlow starts in any of our processes (driver, Ray workers, SuperNodes):
# GPU users then share one GPU between workers instead of the first worker taking it all.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
# TensorFlow's C++ start-up lines (CPU features, no CUDA driver found: "failed call to
# cuInit ... (303)" reads like a failure) only on request: TF_CPP_MIN_LOG_LEVEL=0 shows them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
