"""ns_train: the compact Noisy Student trainer (PyTorch + timm), reading shards with ns_data's PyTorch reader."""
