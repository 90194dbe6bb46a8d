"""PickScore export: model sources, PyTorch towers -> ONNX, the PyTorch reference and the numerics gate.

Heavy (torch, transformers, onnx). May import pickscore_runtime so export and runtime agree by construction.
"""
