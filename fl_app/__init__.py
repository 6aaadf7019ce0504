"""fl_app: federated image classification with Flower and Keras."""

import os

# Set before TensorFlow starts in any of our processes (driver, Ray workers, SuperNodes):
# GPU users then share one GPU between workers instead of the first worker taking it all.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
# TensorFlow's C++ log lines once it has started (on a machine without a GPU, "failed call
# to cuInit ... (303)", which reads like a failure) only on request: TF_CPP_MIN_LOG_LEVEL=0
# shows them. Its start-up lines print whatever the level (fl_app/console.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
