"""The workstation role: a Hugging Face model -> a device bundle (.pte / .onnx + manifest).

``fedmobillm.export.models`` resolves named, offline models (MiniLM-L6, MiniLM-L3,
SmolLM2-135M) to local Hugging Face folders; ``fedmobillm.export.pipeline`` builds bundles.
Submodules import torch / transformers lazily; importing this package costs nothing.
"""
