"""The evaluation harness (`harness`) and the algorithms the registered protocols
(`mugbench.protocols`) are built from: k-NN, linear probe, fine-tuning, segmentation, zero-shot,
retrieval, captioning, reconstruction, and feature extraction."""
